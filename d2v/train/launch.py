"""Builds a Run from a resolved config: picks the batch streams (shards or synthetic)."""
from __future__ import annotations

from typing import Any

from d2v.config.schema import D2vConfig
from d2v.train.run import Run
from d2v.train.streams import SyntheticStream


def build_run(cfg: D2vConfig, ds_template: dict[str, Any], *, resume: str = "none", console: bool = True,
              init_from: str | None = None) -> Run:
    if cfg.data.train_shards:
        from d2v.train.shard_streams import shard_stream_factories

        make_stream, make_val = shard_stream_factories(cfg)
    else:
        def make_stream(rank: int, world_size: int) -> SyntheticStream:
            return SyntheticStream(cfg, rank=rank, world_size=world_size)

        make_val = None
    return Run(cfg, ds_template, make_stream, make_val_stream=make_val, resume=resume, console=console,
               init_from=init_from)
