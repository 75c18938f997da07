"""Data pipeline: shard preparation, deterministic resumable loaders, demo data (docs/method.md §4).

Never imports d2v.models or deepspeed (docs/method.md §2).
"""
from d2v.data.audio import (AudioLoaderOptions, audio_train_loader, audio_validation_loader, collate_audio,
                            span_mask_fn)
from d2v.data.loader import STATS_KEY, WEIGHT_KEY, TrainLoader, ValidationLoader
from d2v.data.shards import expand_pattern

__all__ = ["AudioLoaderOptions", "audio_train_loader", "audio_validation_loader", "collate_audio",
           "span_mask_fn", "TrainLoader", "ValidationLoader", "expand_pattern", "STATS_KEY", "WEIGHT_KEY"]
