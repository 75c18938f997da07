"""The speech data pipeline (d2v.data.audio) as batch streams for the run loop."""
from __future__ import annotations

from typing import Any

from d2v.batch import Batch
from d2v.config.schema import D2vConfig


def loader_options(cfg: D2vConfig):
    from d2v.data import AudioLoaderOptions

    d = cfg.data
    return AudioLoaderOptions(sample_rate=cfg.model.audio.sample_rate, min_sample_size=d.min_sample_size,
                              max_sample_size=d.max_sample_size, max_samples_per_batch=d.max_samples_per_batch,
                              normalize=d.normalize, pad=d.pad, bucket_buffer=min(d.buffer_size, 512))


def mask_fn(cfg: D2vConfig):
    from d2v.data import span_mask_fn

    if cfg.model.v2.enabled:
        from d2v.masking.multimask import multi_mask_fn

        return multi_mask_fn(cfg)  # B×M×T 1-D block masks (data2vec 2.0)
    mk = cfg.masking
    return span_mask_fn(mask_prob=mk.mask_prob, mask_length=mk.mask_length, min_masks=mk.min_masks,
                        equalize=mk.equalize)


class LoaderStream:
    """A TrainLoader (epochs of equal length on every rank) read one batch at a time."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self._it = None

    def next_batch(self) -> Batch:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:  # the epoch ended: the loader moved on to the next one
                self._it = None
        raise RuntimeError("the data loader yields no batches")

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None

    def restart_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
        self._it = None

    def counters(self) -> dict[str, int]:
        s = self.loader.stats
        return {"corrupt_samples": s.get("corrupt", 0), "bad_shards": s.get("bad_shards", 0),
                "filler_batches": s.get("filler_batches", 0), "dropped_batches": s.get("dropped_batches", 0)}


def audio_stream_factories(cfg: D2vConfig):
    from d2v.data import audio_train_loader, audio_validation_loader

    options, masks = loader_options(cfg), mask_fn(cfg)

    def make_stream(rank: int, world_size: int) -> LoaderStream:
        return LoaderStream(audio_train_loader(cfg.data.train_shards, options, masks, seed=cfg.train.seed, rank=rank,
                                               world_size=world_size, num_workers=cfg.data.num_workers))

    make_val = None
    if cfg.data.val_shards:
        def make_val(rank: int, world_size: int):
            return audio_validation_loader(cfg.data.val_shards, options, masks, seed=cfg.train.seed, rank=rank,
                                           world_size=world_size, num_workers=0)

    return make_stream, make_val
