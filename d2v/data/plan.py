"""Epoch plans: which samples every (rank, worker) stream batches together, from lengths alone.

docs/method.md §4. A plan is a pure function of (sidecar lengths, seed, epoch, world size, workers per
rank, batching options), so every rank computes every rank's plan identically without
communication or decoding, and a resumed run recomputes where it stopped.

Training epoch, step by step:
1. shards are ordered by a permutation of (seed, epoch);
2. samples shorter than `min_length` are dropped (counted); the rest, in that shard order, form
   the epoch's sequence;
3. stream s = rank · workers + worker takes the contiguous slice s of that sequence;
4. each stream cuts its slice into chunks of `buffer` samples; a chunk is sorted by length
   (ties broken at random) and cut greedily into batches whose size × padded length stays within
   `budget` (fairseq's max_tokens); the chunk's batches are then shuffled. Randomness comes
   from a generator seeded by (seed, epoch, rank, worker, chunk). With `fixed_size` (images,
   text blocks) lengths are ignored: a chunk (a multiple of the batch size) is shuffled and cut
   into batches of exactly `max_batch_size`; a stream's last few samples that fill no batch are
   left out and counted;
5. every stream yields the same number of batches, the smallest any stream of any rank has, so
   all ranks run `workers × that` steps; the batches beyond it are dropped and counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d2v.data.shards import Item, ShardIndex, epoch_shard_order, slice_bounds, stream_seed


@dataclass(frozen=True)
class BatchingOptions:
    """How samples are grouped into batches (lengths in samples, e.g. audio samples at 16 kHz)."""

    budget: int  # batch size × padded length must not exceed this (max_tokens)
    max_length: int  # longer samples are cropped to this, so it is their padded length
    min_length: int = 0  # shorter samples are skipped
    buffer: int = 512  # samples sorted together by the length-bucketing buffer
    max_batch_size: int | None = None
    fixed_size: bool = False  # every batch has exactly max_batch_size samples, whatever their lengths

    @staticmethod
    def fixed(batch_size: int, buffer: int) -> "BatchingOptions":
        """Batches of exactly `batch_size` samples, shuffled within chunks of about `buffer` samples."""
        return BatchingOptions(budget=batch_size, max_length=1, buffer=-(-max(buffer, 1) // batch_size) * batch_size,
                               max_batch_size=batch_size, fixed_size=True)

    def validate(self) -> None:
        if self.max_length > self.budget:
            raise ValueError(
                f"max_samples_per_batch ({self.budget}) is smaller than max_sample_size ({self.max_length}): "
                "raise the budget or lower max_sample_size so that one cropped sample fits")
        if self.min_length > self.max_length:
            raise ValueError(f"min_sample_size ({self.min_length}) exceeds max_sample_size ({self.max_length})")
        if self.buffer < 1:
            raise ValueError(f"bucket buffer must be >= 1, got {self.buffer}")
        if self.fixed_size and (self.max_batch_size or 0) < 1:
            raise ValueError(f"fixed-size batches need a batch size >= 1, got {self.max_batch_size}")


def bucket_batches(items: list[Item], lengths: np.ndarray, options: BatchingOptions,
                   rng: np.random.Generator | None) -> list[list[Item]]:
    """Sorts `items` by (capped) length and cuts them into batches within the budget.

    rng None keeps the input order for ties and the batch order sorted (validation).
    """
    capped = np.ones(len(items), np.int64) if options.fixed_size else np.minimum(lengths, options.max_length)
    order = np.arange(len(items)) if rng is None else rng.permutation(len(items))
    order = order[np.argsort(capped[order], kind="stable")]
    batches: list[list[Item]] = []
    current: list[Item] = []
    for i in order.tolist():
        # Ascending order: the newcomer is the longest, so it sets the padded length.
        too_many = options.max_batch_size is not None and len(current) >= options.max_batch_size
        if current and (too_many or (len(current) + 1) * int(capped[i]) > options.budget):
            batches.append(current)
            current = []
        current.append(items[i])
    if current and (not options.fixed_size or len(current) == options.max_batch_size):
        batches.append(current)
    if rng is not None:
        batches = [batches[j] for j in rng.permutation(len(batches)).tolist()]
    return batches


@dataclass(frozen=True)
class PlannedBatch:
    """The items of one batch and the read group they come from (a bucketing chunk): a worker
    reads a whole group's raw samples at once, in shard order, then cuts its batches from them."""

    items: list[Item]
    group: int


@dataclass(frozen=True)
class EpochPlan:
    """Batches of every stream (stream = rank · workers + worker) for one epoch."""

    epoch: int
    world_size: int
    workers: int
    streams: list[list[PlannedBatch]]
    too_short: int
    leftover: tuple[int, ...] = ()  # per stream: samples that filled no fixed-size batch

    @property
    def batches_per_stream(self) -> int:
        return min(len(s) for s in self.streams)

    @property
    def steps_per_epoch(self) -> int:
        """Steps every rank runs this epoch (the same on all ranks)."""
        return self.workers * self.batches_per_stream

    def stream(self, rank: int, worker: int) -> list[PlannedBatch]:
        """The batches that (rank, worker) yields, already cut to the common length."""
        return self.streams[rank * self.workers + worker][: self.batches_per_stream]

    def leftover_samples(self, rank: int) -> int:
        """Samples of `rank`'s slices that filled no fixed-size batch."""
        return sum(self.leftover[rank * self.workers: (rank + 1) * self.workers])

    def dropped_batches(self, rank: int) -> int:
        """Batches of `rank` left out so that all ranks run the same number of steps."""
        mine = self.streams[rank * self.workers: (rank + 1) * self.workers]
        return sum(len(s) for s in mine) - self.steps_per_epoch


def _eligible(index: ShardIndex, shard: int, min_length: int) -> np.ndarray:
    return np.flatnonzero(index.lengths[shard] >= min_length)


def train_plan(index: ShardIndex, options: BatchingOptions, *, seed: int, epoch: int,
               world_size: int, workers: int) -> EpochPlan:
    """The training plan of `epoch` (see the module docstring)."""
    workers = max(1, workers)
    sequence: list[Item] = []
    lengths: list[int] = []
    too_short = 0
    for shard in epoch_shard_order(len(index.paths), seed, epoch):
        keep = _eligible(index, shard, options.min_length)
        too_short += len(index.lengths[shard]) - len(keep)
        sequence.extend((shard, int(i)) for i in keep)
        lengths.extend(index.lengths[shard][keep].tolist())
    all_lengths = np.asarray(lengths, dtype=np.int64)
    num_streams = world_size * workers
    if len(sequence) < num_streams:
        raise ValueError(f"{len(sequence)} usable samples cannot feed {world_size} ranks × {workers} workers")
    streams: list[list[PlannedBatch]] = []
    leftover: list[int] = []
    for s in range(num_streams):
        start, stop = slice_bounds(len(sequence), num_streams, s)
        rank, worker = divmod(s, workers)
        batches: list[PlannedBatch] = []
        leftover.append(0)
        for chunk, c0 in enumerate(range(start, stop, options.buffer)):
            c1 = min(c0 + options.buffer, stop)
            rng = np.random.default_rng(stream_seed(seed, epoch, rank, worker, chunk, 0xB0C))
            cut = bucket_batches(sequence[c0:c1], all_lengths[c0:c1], options, rng)
            leftover[-1] += (c1 - c0) - sum(len(b) for b in cut)
            batches.extend(PlannedBatch(items, chunk) for items in cut)
        streams.append(batches)
    if not options.fixed_size:
        _even_out(streams)
    return EpochPlan(epoch, world_size, workers, streams, too_short, tuple(leftover))


def _even_out(streams: list[list[PlannedBatch]]) -> None:
    """Budgeted batches: streams cut from equal slices still end with different batch counts, and
    every rank runs the smallest count (the rest would be dropped: about 9 % of a rank's batches at
    512 ranks with one or two utterances a batch). Streams below the largest count split their
    fullest batches in two instead (each half stays within the budget; the items stay in order)
    until every stream reaches it or has only single-item batches left."""
    target = max(len(s) for s in streams)
    for stream in streams:
        while len(stream) < target:
            i = max(range(len(stream)), key=lambda j: (len(stream[j].items), -j))
            batch = stream[i]
            if len(batch.items) < 2:
                break
            half = len(batch.items) // 2
            stream[i:i + 1] = [PlannedBatch(batch.items[:half], batch.group),
                               PlannedBatch(batch.items[half:], batch.group)]


def validation_plan(index: ShardIndex, options: BatchingOptions, *,
                    world_size: int) -> tuple[list[list[PlannedBatch | None]], int]:
    """A fixed validation plan: per rank, its batches padded with None to a common count.

    All samples in shard order are sorted by length and batched (no randomness); batch j goes to
    rank j mod world_size, so every rank has ceil(batches / world_size) steps; the missing last
    ones are None (the loader yields a weight-0 filler batch there). Returns (per-rank lists of
    batches, samples skipped as too short).
    """
    items: list[Item] = []
    too_short = 0
    for shard in range(len(index.paths)):
        keep = _eligible(index, shard, options.min_length)
        too_short += len(index.lengths[shard]) - len(keep)
        items.extend((shard, int(i)) for i in keep)
    lengths = np.asarray([index.lengths[s][i] for s, i in items], dtype=np.int64)
    batches = [PlannedBatch(b, j) for j, b in enumerate(bucket_batches(items, lengths, options, rng=None))]
    steps = -(-len(batches) // world_size)
    per_rank: list[list[PlannedBatch | None]] = []
    for rank in range(world_size):
        mine: list[PlannedBatch | None] = list(batches[rank::world_size])
        per_rank.append(mine + [None] * (steps - len(mine)))
    return per_rank, too_short
