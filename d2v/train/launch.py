"""Builds a Run from a resolved config: picks the batch streams (shards or synthetic)."""
from __future__ import annotations

import os
import sys
from typing import Any

from d2v.config.batch_plan import run_config
from d2v.config.schema import D2vConfig
from d2v.train import distributed
from d2v.train.run import Run
from d2v.train.streams import SyntheticStream


def build_run(cfg: D2vConfig, ds_template: dict[str, Any], *, resume: str = "none", console: bool = True,
              init_from: str | None = None) -> Run:
    """The config is resolved for this world size (batch plan applied, frozen) before anything
    reads it: the loader draws the batch the plan and the logs state."""
    cfg, batch_plan = run_config(cfg, distributed.planned_world_size())
    if cfg.data.train_shards:
        from d2v.train.shard_streams import shard_stream_factories

        make_stream, make_val = shard_stream_factories(cfg)
    else:
        def make_stream(rank: int, world_size: int) -> SyntheticStream:
            return SyntheticStream(cfg, rank=rank, world_size=world_size)

        make_val = None
    return Run(cfg, ds_template, make_stream, batch_plan=batch_plan, make_val_stream=make_val, resume=resume,
               console=console, init_from=init_from)


# What a run can know is wrong before it trains: a bad config value, a missing or changed shard,
# results it would replace. Reported as one message, not a traceback.
STARTUP_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)
EXIT_USAGE = 2


def report_startup_error(err: BaseException) -> int:
    """Prints `error: <what to change>` on stderr (the traceback with D2V_TRACEBACK=1); returns 2."""
    if os.environ.get("D2V_TRACEBACK"):
        import traceback

        traceback.print_exception(err)
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and err.strerror and err.filename is None:
        message = err.strerror  # d2v's own OSErrors carry the whole message there, not "[Errno N]"
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE
