"""Fixed-size batches from WebDataset shards, distributed and resumable (docs/method.md §4), for the
image and text pipelines.

* Shard order is a function of (seed, epoch); shard i of that order goes to rank i mod W, and a
  rank's shards are dealt to its loader workers the same way, so every rank reads a disjoint stream.
* A sidecar (`index.json`: samples per shard, written by `prepare`) lets every rank compute every
  rank's batch count without reading data: all ranks run min over ranks of those counts per epoch
  (the surplus is dropped and counted), so no rank hangs or starves at an epoch's end.
* Each worker's shuffle buffer, batching and random draws (augmentation, masks) are seeded by
  (seed, epoch, rank, worker, batch index). The DataLoader hands out worker batches round-robin,
  so (epoch, batches consumed) pins every worker's position: a resume at the same world size
  replays the raw stream (tar members, nothing decoded) up to it and continues sample-exactly.
  At another world size the data restarts at the recorded epoch boundary.
* A sample that fails to decode is skipped and counted; its batch is one smaller.
"""
from __future__ import annotations

import json
import os
import random
import tarfile
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from d2v.batch import Batch
from d2v.data.loader import pin_batches
from d2v.data.shards import expand_pattern

RawSample = dict[str, Any]
# decode_batch(raw samples, generator) -> (Batch, number of samples skipped as corrupt)
BatchDecoder = Callable[[list[RawSample], torch.Generator], tuple[Batch, int]]


def shard_counts(paths: list[str]) -> dict[str, int]:
    """Samples per shard from the `index.json` beside them, else by reading tar headers."""
    index_path = os.path.join(os.path.dirname(paths[0]), "index.json")
    index = {}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    counts = {}
    for p in paths:
        name = os.path.basename(p)
        if name in index:
            counts[p] = int(index[name])
        else:
            with tarfile.open(p) as tar:
                counts[p] = len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return counts


def iter_raw(path: str) -> Iterator[RawSample]:
    """Samples of one tar shard as {"__key__", ext: bytes}; a truncated shard ends early."""
    current: RawSample | None = None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = os.path.basename(member.name).partition(".")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": os.path.basename(path)}
                current[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError):
        pass  # a damaged shard: what was read before the damage is used
    if current is not None:
        yield current


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**61 - 1)
    return s


class EpochPlan:
    """Who reads which shard in an epoch, and how many batches everyone runs."""

    def __init__(self, paths: list[str], counts: dict[str, int], *, seed: int, epoch: int, world_size: int,
                 num_workers: int, batch_size: int) -> None:
        order = list(paths)
        random.Random(_seed(seed, epoch)).shuffle(order)
        self.workers = max(1, num_workers)
        self.shards = {(r, w): [] for r in range(world_size) for w in range(self.workers)}
        for i, path in enumerate(order):
            rank = i % world_size
            self.shards[rank, (i // world_size) % self.workers].append(path)
        self.batches = {k: sum(counts[p] for p in v) // batch_size for k, v in self.shards.items()}
        per_rank = [sum(self.batches[r, w] for w in range(self.workers)) for r in range(world_size)]
        self.steps = min(per_rank)
        self.dropped = {r: per_rank[r] - self.steps for r in range(world_size)}
        if self.steps == 0:
            raise ValueError(f"{len(paths)} shards of {sum(counts.values())} samples give rank "
                             f"{per_rank.index(0)} no batch of {batch_size}: use more or smaller shards, fewer "
                             f"ranks or loader workers, or a smaller batch")

    def consumed_per_worker(self, rank: int, consumed: int) -> list[int]:
        """Batches each worker of `rank` delivered when the rank had consumed `consumed` batches
        (the DataLoader takes one batch from each live worker in turn)."""
        left = [self.batches[rank, w] for w in range(self.workers)]
        taken = [0] * self.workers
        w = 0
        for _ in range(consumed):
            while left[w] == 0:
                w = (w + 1) % self.workers
            taken[w] += 1
            left[w] -= 1
            w = (w + 1) % self.workers
        return taken


class _Epoch(IterableDataset):
    def __init__(self, plan: EpochPlan, rank: int, epoch: int, skip: list[int], *, seed: int, batch_size: int,
                 shuffle_buffer: int, decode: BatchDecoder) -> None:
        self.plan, self.rank, self.epoch, self.skip = plan, rank, epoch, skip
        self.seed, self.batch_size, self.buffer, self.decode = seed, batch_size, shuffle_buffer, decode

    def _raw_batches(self, worker: int) -> Iterator[list[RawSample]]:
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, 1))
        buf: list[RawSample] = []
        batch: list[RawSample] = []

        def emit(sample):
            batch.append(sample)
            if len(batch) == self.batch_size:
                out = list(batch)
                batch.clear()
                return out
            return None

        for path in self.plan.shards[self.rank, worker]:
            for sample in iter_raw(path):
                if len(buf) < self.buffer:
                    buf.append(sample)
                    continue
                i = rng.randrange(len(buf))
                buf[i], sample = sample, buf[i]
                full = emit(sample)
                if full:
                    yield full
        rng.shuffle(buf)
        for sample in buf:
            full = emit(sample)
            if full:
                yield full

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = [worker] if info is not None else list(range(self.plan.workers))
        iters = {w: self._numbered(w) for w in workers}
        # In-process loading (no workers) reproduces the DataLoader's round-robin itself.
        while iters:
            for w in list(iters):
                try:
                    yield next(iters[w])
                except StopIteration:
                    del iters[w]

    def _numbered(self, worker: int):
        limit = self.plan.batches[self.rank, worker]
        for j, raw in enumerate(self._raw_batches(worker)):
            if j >= limit:
                return
            if j < self.skip[worker]:
                continue  # replay without decoding
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank, worker, j, 2))
            batch, bad = self.decode(raw, g)
            batch.extras["corrupt"] = bad
            yield batch


class FixedBatchStream:
    """The BatchStream the run loop consumes (see d2v.train.streams)."""

    def __init__(self, pattern: str, decode: BatchDecoder, *, batch_size: int, rank: int, world_size: int,
                 seed: int, num_workers: int = 0, shuffle_buffer: int = 256) -> None:
        self.paths = expand_pattern(pattern)
        self.counts = shard_counts(self.paths)
        self.decode, self.batch_size = decode, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.epoch, self.consumed = 0, 0
        self.corrupt, self.dropped_batches = 0, 0
        self._iter: Iterator[Batch] | None = None
        self._plan: EpochPlan | None = None

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.paths, self.counts, seed=self.seed, epoch=epoch, world_size=self.world_size,
                         num_workers=self.num_workers, batch_size=self.batch_size)

    def _start(self) -> None:
        self._plan = self.plan(self.epoch)
        skip = self._plan.consumed_per_worker(self.rank, self.consumed)
        dataset = _Epoch(self._plan, self.rank, self.epoch, skip, seed=self.seed, batch_size=self.batch_size,
                         shuffle_buffer=self.shuffle_buffer, decode=self.decode)
        if self.num_workers > 0:
            loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                                pin_memory=pin_batches())
            self._iter = iter(loader)
        else:
            self._iter = iter(dataset)

    def next_batch(self) -> Batch:
        if self._iter is None:
            self._start()
        if self.consumed >= self._plan.steps:
            self.dropped_batches += self._plan.dropped[self.rank]
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start()
        batch = next(self._iter)
        self.consumed += 1
        self.corrupt += int(batch.extras.get("corrupt", 0))
        return batch

    def steps_per_epoch(self) -> int:
        return self.plan(self.epoch).steps

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._iter = None

    def restart_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = int(epoch), 0
        self._iter = None

    def counters(self) -> dict[str, int]:
        return {"corrupt_samples": self.corrupt, "dropped_batches": self.dropped_batches}


def validation_batches(pattern: str, decode: BatchDecoder, *, batch_size: int, rank: int, world_size: int,
                       seed: int) -> list[Batch]:
    """A fixed list of batches for this rank, the same count on every rank.

    Held-out sets are small: every rank reads them whole in order, batch j goes to rank j mod W,
    and every rank keeps floor(batches / W) of them (the few left over are not evaluated).
    """
    paths = expand_pattern(pattern)
    raw: list[RawSample] = [s for p in paths for s in iter_raw(p)]
    groups = [raw[i:i + batch_size] for i in range(0, len(raw) - batch_size + 1, batch_size)]
    keep = len(groups) // world_size
    if keep == 0:
        raise ValueError(f"validation shards {pattern!r} hold {len(raw)} samples: fewer than one batch of "
                         f"{batch_size} per rank for {world_size} ranks")
    out = []
    for j in range(rank, keep * world_size, world_size):
        batch, bad = decode(groups[j], torch.Generator().manual_seed(_seed(seed, j, 3)))
        batch.extras["corrupt"] = bad
        out.append(batch)
    return out
