"""Batch streams the run loop consumes: a small protocol with resumable position.

A stream yields micro-batches for this rank, reports counters (skipped or corrupt samples) and
saves/restores its position, so a resumed run continues with exactly the batches an
uninterrupted one would have seen (docs/method.md §4).
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

from d2v.batch import Batch
from d2v.config.schema import D2vConfig
from d2v.data.synthetic import synthetic_batch


class BatchStream(Protocol):
    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def counters(self) -> dict[str, int]: ...


class SyntheticStream:
    """Synthetic batches of the config's modality; rank r of W draws indices r, r+W, ... so ranks differ."""

    def __init__(self, cfg: D2vConfig, *, rank: int = 0, world_size: int = 1, seed: int | None = None) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.seed = cfg.train.seed if seed is None else seed
        self.position = 0

    def next_batch(self) -> Batch:
        batch = synthetic_batch(self.cfg, self.cfg.train.micro_batch_size, seed=self.seed,
                                index=self.position * self.world_size + self.rank)
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def counters(self) -> dict[str, int]:
        return {}
