"""Batch streams over prepared shards, for every modality: the bridge from d2v.data to the run loop.

Every modality runs the same loader (d2v.data.loader: a plan from the sidecar, resumable
position, one bad-data policy); what differs is a modality's batching (length-bucketed audio,
fixed-size image and text batches) and its BatchMaker (decode, augment, collate, mask), both
built here from the config, one function each per modality, registered in PIPELINES; every
modality masks with the run's one mask maker (d2v.masking.makers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from d2v.batch import Batch
from d2v.config.modalities import modality_spec
from d2v.config.schema import D2vConfig
from d2v.data.loader import BatchMaker, TrainLoader, ValidationLoader
from d2v.data.plan import BatchingOptions
from d2v.data.shards import expand_pattern, load_index
from d2v.masking.makers import mask_maker


def _audio_options(cfg: D2vConfig):
    from d2v.data import AudioLoaderOptions

    return AudioLoaderOptions.from_config(cfg)


def _fixed_batching(cfg: D2vConfig) -> BatchingOptions:
    return BatchingOptions.fixed(cfg.train.micro_batch_size, min(cfg.data.buffer_size, 4096))


def _audio_maker(cfg: D2vConfig, train: bool) -> BatchMaker:
    from d2v.data.audio import AudioBatchMaker

    return AudioBatchMaker(_audio_options(cfg), mask_maker(cfg))


def _image_maker(cfg: D2vConfig, train: bool) -> BatchMaker:
    from d2v.data.image import ImageBatchMaker, ImageTransform, image_collate

    m = cfg.model
    transform = ImageTransform(m.image.image_size, m.image.mean, m.image.std, scale=m.image.crop_scale,
                               color_jitter=m.image.color_jitter, train=train)
    masks, patches = mask_maker(cfg), modality_spec(m.modality).positions(m, None)

    def collate(images, labels, keys, g):
        return image_collate(images, labels, keys, masks=masks, num_patches=patches, g=g)
    return ImageBatchMaker(transform, collate)


def _text_maker(cfg: D2vConfig, train: bool) -> BatchMaker:
    from d2v.data.text import TextBatchMaker, TokenView, text_collate

    t, mk = cfg.model.text, cfg.masking
    masks = mask_maker(cfg)
    # The student that fills the masked positions reads a token view with <mask> (1.0); the one
    # that drops them reads the clean tokens.
    view = None if cfg.model.drops_masked else TokenView(t.vocab_size - 1, mk.random_token_prob, mk.leave_unmasked_prob)

    def collate(blocks, keys, g):
        return text_collate(blocks, keys, pad_id=t.pad_id, masks=masks, token_view=view, g=g)
    first_regular = max(t.pad_id, t.bos_id, t.eos_id, t.unk_id) + 1
    return TextBatchMaker(max_positions=t.max_positions, vocab_size=t.vocab_size, first_regular_id=first_regular,
                          collate=collate)


def _check_text_shards(cfg: D2vConfig, pattern: str) -> None:
    from d2v.data.text import check_tokenizer, load_tokenizer_meta

    check_tokenizer(load_tokenizer_meta(pattern), cfg.model.text)


@dataclass(frozen=True)
class Pipeline:
    """A modality's part of the shard pipeline."""

    batching: Callable[[D2vConfig], BatchingOptions]
    maker: Callable[[D2vConfig, bool], BatchMaker]
    needs_lengths: bool  # False: shards without a sidecar are planned from their tar headers
    check: Callable[[D2vConfig, str], None] | None = None


PIPELINES: dict[str, Pipeline] = {
    "audio": Pipeline(lambda cfg: _audio_options(cfg).batching(), _audio_maker, needs_lengths=True),
    "image": Pipeline(_fixed_batching, _image_maker, needs_lengths=False),
    "text": Pipeline(_fixed_batching, _text_maker, needs_lengths=False, check=_check_text_shards),
}


class LoaderStream:
    """A TrainLoader (epochs of equal length on every rank) read one batch at a time."""

    def __init__(self, loader: TrainLoader) -> None:
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

    def damaged_shards(self) -> list[float]:
        """1.0 for every shard this rank found damaged, 0.0 for the others (in index order)."""
        return [float(i in self.loader.bad_shards) for i in range(len(self.loader.index.paths))]

    def counters(self) -> dict[str, int]:
        s = self.loader.stats
        return {"corrupt_samples": s.get("corrupt", 0), "missing_samples": s.get("missing", 0),
                "bad_shards": len(self.loader.bad_shards), "filler_batches": s.get("filler_batches", 0),
                "dropped_batches": s.get("dropped_batches", 0), "leftover_samples": s.get("leftover", 0)}


def _index(cfg: D2vConfig, pattern: str, pipeline: Pipeline):
    if pipeline.check is not None:
        pipeline.check(cfg, pattern)
    return load_index(expand_pattern(pattern), scan_unlisted=not pipeline.needs_lengths)


def shard_stream_factories(cfg: D2vConfig):
    """(make_stream(rank, world), make_val_stream(rank, world) or None) for the config's modality.

    Both shard sets are indexed here, before any engine is built: a pattern that matches
    nothing, a sidecar that disagrees with its files or a tokenizer the model was not sized for
    fails the run in its first seconds."""
    pipeline = PIPELINES[cfg.model.modality]
    batching = pipeline.batching(cfg)
    train_index = _index(cfg, cfg.data.train_shards, pipeline)
    val_index = _index(cfg, cfg.data.val_shards, pipeline) if cfg.data.val_shards else None
    train_maker = pipeline.maker(cfg, True)

    def make_stream(rank: int, world_size: int) -> LoaderStream:
        return LoaderStream(TrainLoader(train_index, batching, train_maker, seed=cfg.train.seed, rank=rank,
                                        world_size=world_size, num_workers=cfg.data.num_workers,
                                        name=cfg.data.train_shards))

    if val_index is None:
        return make_stream, None
    val_maker = pipeline.maker(cfg, False)

    def make_val(rank: int, world_size: int) -> ValidationLoader:
        return ValidationLoader(val_index, batching, val_maker, seed=cfg.train.seed, rank=rank,
                                world_size=world_size, num_workers=0, name=cfg.data.val_shards)

    return make_stream, make_val

