"""Presets as Python functions (STYLE.md 2): `audio_large()` starts from `audio_base()` and
changes what differs. Numbers from DESIGN.md 3.2.
"""
from __future__ import annotations

from typing import Callable

from d2v.config.schema import D2vConfig

_PRESETS: dict[str, Callable[[], D2vConfig]] = {}


def preset(fn: Callable[[], D2vConfig]) -> Callable[[], D2vConfig]:
    _PRESETS[fn.__name__] = fn
    return fn


@preset
def audio_base() -> D2vConfig:
    """data2vec 1.0 speech Base: 12x768, LibriSpeech 960h recipe (DESIGN.md 3.2)."""
    cfg = D2vConfig(name="audio_base")
    # The schema's defaults are this preset; spell out the recipe-defining ones for readers.
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads, cfg.model.ffn_dim = 768, 12, 12, 3072
    cfg.teacher.top_k, cfg.teacher.layer_norm, cfg.teacher.final_norm = 8, "instance", None
    cfg.optim.lr, cfg.optim.schedule, cfg.train.max_steps = 5e-4, "tri_stage", 400_000
    return cfg


@preset
def audio_large() -> D2vConfig:
    """data2vec 1.0 speech Large: 24x1024, 16 heads."""
    cfg = audio_base()
    cfg.name = "audio_large"
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads, cfg.model.ffn_dim = 1024, 24, 16, 4096
    cfg.teacher.top_k = 8
    return cfg


@preset
def audio_tiny() -> D2vConfig:
    """A 2-block, 64-wide speech model that steps in well under a second on a CPU.

    Schedules are scaled to runs of a few hundred updates: EMA 0.99 -> 0.999 over 200, warmup
    10%, collapse guard armed after 150 updates.
    """
    cfg = audio_base()
    cfg.name = "audio_tiny"
    m = cfg.model
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 64, 2, 4, 128
    m.audio.conv_layers = ((32, 10, 5), (32, 3, 2), (32, 3, 2), (32, 3, 2), (32, 3, 2), (32, 2, 2), (32, 2, 2))
    m.layerdrop = 0.0
    cfg.teacher.top_k = 2
    cfg.teacher.ema_start, cfg.teacher.ema_end, cfg.teacher.ema_anneal_steps = 0.99, 0.999, 200
    cfg.loss.guard_after = 150
    cfg.optim.lr = 1e-3
    cfg.optim.phase_ratios = (0.1, 0.6, 0.3)
    cfg.train.max_steps = 300
    cfg.train.micro_batch_size = 4
    cfg.train.log_every = 10
    cfg.train.save_every = 100
    cfg.data.min_sample_size = 8_000
    cfg.data.max_sample_size = 48_000
    cfg.data.max_samples_per_batch = 160_000
    cfg.data.synthetic_seconds = 1.0
    return cfg


def get_preset(name: str) -> D2vConfig:
    """Returns a fresh config of the named preset."""
    try:
        return _PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(list_presets())}") from None


def list_presets() -> list[str]:
    return sorted(_PRESETS)
