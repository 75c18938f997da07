"""Deterministic, resumable shard loaders around torch's DataLoader (modality-generic).

docs/method.md §4. The plan (`d2v.data.plan`) says which samples every (rank, worker) stream batches;
this module runs it:

* `PlannedBatches` is the IterableDataset a DataLoader worker runs: it reads its stream's
  samples group by group (`ShardReader`), and a modality's `BatchMaker` decodes and collates
  them with a torch.Generator seeded by (seed, epoch, rank, worker, position);
* `TrainLoader` owns the epoch counter and the number of batches consumed in the main process,
  which is what a checkpoint records. With k workers, step i of an epoch is batch i // k of
  worker i mod k (every worker yields the same count, so DataLoader's round robin never skips
  one); resuming after c batches restarts worker w at its own position and rotates the workers
  so that the first batch after resume is step c's.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Iterator, Protocol, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from d2v.batch import Batch
from d2v.data.plan import BatchingOptions, EpochPlan, PlannedBatch, train_plan, validation_plan
from d2v.data.shards import Item, ShardIndex, ShardReader, epoch_shard_order, stream_seed

log = logging.getLogger(__name__)

STATS_KEY = "data_stats"  # per-batch counter deltas, carried in Batch.extras from the workers
BROKEN_KEY = "broken_shards"  # shard numbers found unreadable while making this batch
WEIGHT_KEY = "weight"  # 1.0 for real batches, 0.0 for filler batches (multiply the loss by it)


class BatchMaker(Protocol):
    """Turns raw samples into a Batch (decode, crop/pad, collate, mask); one per modality."""

    def __call__(self, raw: list[tuple[str, dict[str, bytes]]], generator: torch.Generator,
                 stats: dict[str, int]) -> Batch | None:
        """None when no sample of the batch could be decoded (the loader yields a filler)."""
        ...

    def filler(self, generator: torch.Generator) -> Batch:
        """A small valid batch that stands in for a missing one; it gets weight 0."""
        ...


def _make(maker: BatchMaker, raw: list[tuple[str, dict[str, bytes]]], lengths: list[int],
          generator: torch.Generator, stats: dict[str, int]) -> Batch | None:
    """Calls the maker, with the sidecar's length of each sample when it budgets by them
    (`takes_lengths`): the plan trusted those lengths, so the maker must hold samples to them."""
    if getattr(maker, "takes_lengths", False):
        return maker(raw, generator, stats, lengths=lengths)
    return maker(raw, generator, stats)


def _add(total: dict[str, int], delta: dict[str, int]) -> None:
    for k, v in delta.items():
        total[k] = total.get(k, 0) + v


class PlannedBatches(IterableDataset):
    """Yields one rank's planned batches; in worker w of k, the batches of stream worker
    (w + rotation) mod k from `starts[that worker]` on. `batches[w]` is stream worker w's list.

    seeds[w][p] seeds the generator of batch p of stream worker w.
    """

    def __init__(self, index: ShardIndex, batches: Sequence[Sequence[PlannedBatch | None]],
                 seeds: Sequence[Sequence[int]], starts: Sequence[int], rotation: int,
                 maker: BatchMaker, shard_rank: dict[int, int] | None = None):
        self.index, self.batches, self.seeds = index, batches, seeds
        self.starts, self.rotation, self.maker = list(starts), rotation, maker
        self.shard_rank = shard_rank or {}

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        if num_workers != len(self.batches):
            raise RuntimeError(f"planned for {len(self.batches)} workers, running with {num_workers}")
        worker = ((info.id if info is not None else 0) + self.rotation) % num_workers
        plan, seeds = self.batches[worker], self.seeds[worker]
        stats: dict[str, int] = {}
        reader = ShardReader(self.index, stats)
        cache: dict[Item, dict[str, bytes]] = {}
        reported: set[int] = set()
        group = None
        try:
            for position in range(self.starts[worker], len(plan)):
                planned = plan[position]
                generator = torch.Generator().manual_seed(seeds[position])
                batch = None
                if planned is not None:
                    if planned.group != group:
                        group = planned.group
                        # Read the rest of the group in one forward pass through its shards.
                        rest = [it for b in plan[position:] if b is not None and b.group == group for it in b.items]
                        rest.sort(key=lambda item: (self.shard_rank.get(item[0], item[0]), item[1]))
                        cache = reader.read(rest)
                    present = [it for it in planned.items if it in cache]
                    raw = [(self.index.keys[s][i], cache.pop((s, i))) for s, i in present]
                    lengths = [int(self.index.lengths[s][i]) for s, i in present]
                    batch = _make(self.maker, raw, lengths, generator, stats) if raw else None
                    if batch is None:
                        stats["filler_batches"] = stats.get("filler_batches", 0) + 1
                weight = 1.0 if batch is not None else 0.0
                if batch is None:
                    batch = self.maker.filler(generator)
                batch.extras[WEIGHT_KEY] = weight
                batch.extras[STATS_KEY] = dict(stats)
                batch.extras[BROKEN_KEY] = sorted(reader.broken - reported)
                reported |= reader.broken
                stats.clear()
                yield batch
        finally:
            reader.close()


def _data_loader(dataset: PlannedBatches, num_workers: int, prefetch_factor: int) -> DataLoader:
    extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    # batch_size=None: the dataset yields whole batches; no persistent workers, because each
    # epoch (and each resume) hands the workers a new plan. Its own generator: an iterator
    # drawing its base seed from the global RNG would shift dropout after every epoch start and
    # every resume, so a resumed run would diverge from an uninterrupted one (the workers'
    # randomness comes from the plan's seeds, not from that base seed).
    if num_workers > 0:
        extra["worker_init_fn"] = _ignore_preemption_signals
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_batches(),
                      generator=torch.Generator().manual_seed(0), **extra)


def _ignore_preemption_signals(worker_id: int) -> None:
    """The launcher and Slurm send SIGTERM to every process of a rank, its loader workers too; a
    worker killed by it fails the rank's next batch before the step can checkpoint. The main
    process handles the signal (d2v.train.preemption); workers end with the loader (or with
    torch's watchdog when their parent dies)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def pin_batches() -> bool:
    """Pinned batches make the step's non-blocking host-to-device copies asynchronous (from
    pageable memory the driver copies through a staging buffer first). Only with a GPU."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"


class TrainLoader:
    """An endless-by-epochs training loader for one rank.

    `for batch in loader:` yields the rest of the current epoch (exactly `steps_per_epoch` per
    epoch on every rank) and then moves to the next epoch. `state_dict()` after k batches of an
    epoch, loaded into a fresh loader with the same world size and workers, continues with
    batch k + 1 of that epoch, sample-identical; with another world size or worker count the
    recorded epoch restarts from its first batch.

    `stats` (this rank, cumulative since construction; read it for the logs): batches, samples,
    corrupt (undecodable samples left out of their batch), missing (samples a shard did not
    deliver), longer_than_sidecar (of the corrupt: samples longer than lengths.json says, which the
    budget was planned with), bad_shards (unreadable or truncated shards), filler_batches (planned
    batches with nothing decodable: a one-row weight-0 batch stands in), too_short (samples under
    min_sample_size, whole epoch), dropped_batches (this rank's batches beyond the common length).
    """

    def __init__(self, index: ShardIndex, batching: BatchingOptions, maker: BatchMaker, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 prefetch_factor: int = 2, name: str = "training shards"):
        batching.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.index, self.batching, self.maker = index, batching, maker
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.name = name
        self.epoch, self.consumed = 0, 0
        self.stats: dict[str, int] = {}
        self.bad_shards: set[int] = set()  # shard numbers found unreadable, counted once each
        self._plan: EpochPlan | None = None
        if self.plan().steps_per_epoch == 0:
            raise ValueError(f"{name}: {index.num_samples} samples in {len(index.paths)} shards give some stream "
                             f"({world_size} ranks × {self.streams_per_rank} workers) no whole batch: use more "
                             f"data, fewer ranks or data.num_workers, or a smaller batch")

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The epoch's plan for all ranks (cached for the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan is not None and self._plan.epoch == epoch:
            return self._plan
        plan = train_plan(self.index, self.batching, seed=self.seed, epoch=epoch,
                          world_size=self.world_size, workers=self.streams_per_rank)
        if epoch == self.epoch:
            self._plan = plan
        return plan

    @property
    def steps_per_epoch(self) -> int:
        """Steps of the current epoch, equal on all ranks (can differ by a few between epochs)."""
        return self.plan().steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.consumed, "seed": self.seed,
                "world_size": self.world_size, "num_workers": self.streams_per_rank}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["batches_consumed"])
        same = state.get("world_size") == self.world_size and state.get("num_workers") == self.streams_per_rank
        if not same and self.consumed:
            log.warning("data loader state comes from %s ranks × %s workers, this run has %s × %s: "
                        "restarting epoch %d from its first batch", state.get("world_size"),
                        state.get("num_workers"), self.world_size, self.streams_per_rank, self.epoch)
            self.consumed = 0
        if state.get("seed", self.seed) != self.seed:
            log.warning("data loader seed changed from %s to %s", state.get("seed"), self.seed)

    def _dataset(self, plan: EpochPlan) -> PlannedBatches:
        k = self.streams_per_rank
        batches = [plan.stream(self.rank, w) for w in range(k)]
        seeds = [[stream_seed(self.seed, plan.epoch, self.rank, w, p) for p in range(len(b))]
                 for w, b in enumerate(batches)]
        # Worker w has produced the batches of steps w, w + k, ... below `consumed`.
        starts = [max(0, -(-(self.consumed - w) // k)) for w in range(k)]
        order = epoch_shard_order(len(self.index.paths), self.seed, plan.epoch)
        return PlannedBatches(self.index, batches, seeds, starts, self.consumed % k, self.maker,
                              shard_rank={shard: i for i, shard in enumerate(order)})

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        if self.consumed == 0:
            # Planning-time counts, this rank's share so that the logged sums over ranks are right:
            # samples under min_sample_size (counted once, by rank 0, for the whole epoch), batches
            # beyond the common epoch length, samples that filled no fixed-size batch.
            _add(self.stats, {"too_short": plan.too_short if self.rank == 0 else 0,
                              "dropped_batches": plan.dropped_batches(self.rank),
                              "leftover": plan.leftover_samples(self.rank)})
        if self.consumed < plan.steps_per_epoch:
            for batch in _data_loader(self._dataset(plan), self.num_workers, self.prefetch_factor):
                _add(self.stats, batch.extras.pop(STATS_KEY, {}))
                self._note_broken(batch.extras.pop(BROKEN_KEY, []))
                self.consumed += 1
                self.stats["batches"] = self.stats.get("batches", 0) + 1
                self.stats["samples"] = self.stats.get("samples", 0) + batch.batch_size
                yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def _note_broken(self, shards: list[int]) -> None:
        for shard in shards:
            if shard not in self.bad_shards:
                self.bad_shards.add(shard)
                log.warning("rank %d: shard %s is damaged (unreadable or truncated); its unread samples are "
                            "skipped and counted as missing_samples", self.rank, self.index.paths[shard])


class ValidationLoader:
    """A fixed list of validation batches for one rank; every rank yields `steps` batches.

    Batch j of the length-sorted validation set goes to rank j mod world_size; ranks with one
    batch fewer end with a filler batch (`extras["weight"] == 0.0`), so all ranks run the same
    number of forward passes; weight the summed losses by it. Masks and crops are seeded by
    (seed, j), so the result does not depend on the world size.
    """

    def __init__(self, index: ShardIndex, batching: BatchingOptions, maker: BatchMaker, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 name: str = "validation shards"):
        batching.validate()
        self.index, self.maker, self.seed = index, maker, seed
        self.num_workers = num_workers
        per_rank, self.too_short = validation_plan(index, batching, world_size=world_size)
        # Samples of the held-out set no batch holds (fixed-size batching leaves the last few out).
        self.left_out = index.num_samples - self.too_short - sum(len(b.items) for r in per_rank for b in r if b)
        real = sum(b is not None for b in per_rank[-1])
        if real == 0:
            raise ValueError(f"{name}: {index.num_samples} validation samples make {sum(b is not None for r in per_rank for b in r)} "
                             f"batches, fewer than one per rank for {world_size} rank{'s' if world_size != 1 else ''}: add "
                             f"validation data or lower train.micro_batch_size")
        self.batches = per_rank[rank]
        self.rank, self.world_size = rank, world_size
        self.stats: dict[str, int] = {}

    @property
    def steps(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        k = max(1, self.num_workers)
        batches = [self.batches[w::k] for w in range(k)]
        seeds = [[stream_seed(self.seed, -1, b.group if b is not None else -2 - self.rank) for b in lst]
                 for lst in batches]
        dataset = PlannedBatches(self.index, batches, seeds, [0] * k, 0, self.maker)
        self.stats = {}  # this pass's counters (corrupt samples, fillers): a validation reports them
        for batch in _data_loader(dataset, self.num_workers, 2):
            _add(self.stats, batch.extras.pop(STATS_KEY, {}))
            batch.extras.pop(BROKEN_KEY, None)
            yield batch
