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
    # The base decays annealed over the short run: with 0.99 the targets moved faster than the
    # tiny student learned and the demo's loss rose after step 125.
    cfg.teacher.ema_start, cfg.teacher.ema_end, cfg.teacher.ema_anneal_steps = 0.999, 0.9999, 300
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
    cfg.data.num_workers = 0  # CPU demos: decoding in the rank's process leaves the 2 cores to the ranks
    return cfg


def get_preset(name: str) -> D2vConfig:
    """Returns a fresh config of the named preset."""
    try:
        return _PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(list_presets())}") from None


def list_presets() -> list[str]:
    return sorted(_PRESETS)


@preset
def image_base() -> D2vConfig:
    """data2vec 1.0 vision Base: BEiT-style ViT-B/16, ImageNet recipe (DESIGN.md 3.2)."""
    cfg = D2vConfig(name="image_base")
    m = cfg.model
    m.modality, m.layer_norm_first, m.norm_eps = "image", True, 1e-6
    m.dropout, m.attention_dropout, m.activation_dropout, m.layerdrop, m.feature_dropout = 0.0, 0.05, 0.0, 0.0, 0.0
    m.image.layer_scale_init, m.image.drop_path = 1e-4, 0.25
    mk = cfg.masking
    mk.kind, mk.num_mask_patches, mk.min_block_patches, mk.min_aspect, mk.top_up = "block_2d", 120, 16, 0.3, True
    t = cfg.teacher
    # The whole model is averaged (timm-style EMA); the teacher runs its own patch embedding.
    t.ema_modules, t.copy_modules, t.input = ("frontend", "encoder"), (), "source"
    t.top_k, t.tap, t.layer_norm, t.final_norm = 6, "block", "layer", "layer"
    t.ema_start = t.ema_end = 0.9998
    t.ema_anneal_steps = 0
    lo = cfg.loss
    lo.kind, lo.beta, lo.reduction, lo.scale = "smooth_l1", 2.0, "mean", 1.0
    lo.min_target_std = lo.min_pred_std = 0.0  # the reference runs vision without the guard
    o = cfg.optim
    o.lr, o.betas, o.eps, o.weight_decay, o.no_decay_1d = 2e-3, (0.9, 0.999), 1e-8, 0.05, True
    # 2,048 images per update: 625 updates per ImageNet epoch; warmup 10 epochs, 800 epochs.
    o.schedule, o.warmup_steps, o.min_lr, o.clip_norm = "cosine", 6_250, 1e-5, 3.0
    cfg.train.max_steps, cfg.train.micro_batch_size = 500_000, 128
    return cfg


@preset
def image_large() -> D2vConfig:
    """data2vec 1.0 vision Large: ViT-L/16 (layer scale 1e-5, drop path 0.2, attention dropout 0.15)."""
    cfg = image_base()
    cfg.name = "image_large"
    m = cfg.model
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 1024, 24, 16, 4096
    m.attention_dropout, m.image.layer_scale_init, m.image.drop_path = 0.15, 1e-5, 0.2
    cfg.optim.lr = 1e-3
    cfg.train.micro_batch_size = 64
    return cfg


@preset
def image_tiny() -> D2vConfig:
    """32x32 images in 4x4 patches (64 patches), 4 blocks of 64: trains on the demo data in minutes."""
    cfg = image_base()
    cfg.name = "image_tiny"
    m = cfg.model
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 64, 4, 4, 128
    m.image.image_size, m.image.patch_size, m.image.drop_path = 32, 4, 0.1
    m.image.layer_scale_init = 0.1
    cfg.masking.num_mask_patches, cfg.masking.min_block_patches = 39, 4  # 120/196 of 64 patches
    cfg.teacher.top_k = 3
    cfg.teacher.ema_start = cfg.teacher.ema_end = 0.998
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr = 1e-3, 30, 1e-5
    cfg.train.max_steps, cfg.train.micro_batch_size, cfg.train.save_every = 300, 32, 100
    cfg.data.num_workers = 0
    return cfg


@preset
def text_base() -> D2vConfig:
    """data2vec 1.0 text Base: RoBERTa-base layout, span masking of <mask> (DESIGN.md 3.2)."""
    cfg = D2vConfig(name="text_base")
    m = cfg.model
    m.modality, m.head = "text", "mlp"
    m.dropout, m.attention_dropout, m.activation_dropout, m.layerdrop, m.feature_dropout = 0.1, 0.1, 0.0, 0.0, 0.1
    mk = cfg.masking
    mk.kind, mk.mask_prob, mk.mask_length = "text_span", 0.35, 4
    t = cfg.teacher
    # Blocks averaged; embeddings shared: the teacher consumes the student's embedding of the
    # clean tokens (the reference fed it pads at unmasked positions, a known bug).
    t.ema_modules, t.copy_modules, t.input = ("encoder.blocks",), (), "features"
    t.top_k, t.tap, t.layer_norm, t.final_norm = 10, "ffn", "layer", None
    t.ema_start, t.ema_end, t.ema_anneal_steps = 0.999, 0.9999, 100_000
    lo = cfg.loss
    lo.kind, lo.beta, lo.scale, lo.reduction = "smooth_l1", 4.0, 1.0, "sum_per_position"
    o = cfg.optim
    o.lr, o.betas, o.eps, o.weight_decay = 2e-4, (0.9, 0.98), 1e-6, 0.01
    o.schedule, o.warmup_steps, o.clip_norm = "cosine", 10_000, 5.0
    cfg.train.max_steps, cfg.train.micro_batch_size = 1_000_000, 16
    return cfg


@preset
def text_large() -> D2vConfig:
    """data2vec 1.0 text Large: 24x1024, 16 heads."""
    cfg = text_base()
    cfg.name = "text_large"
    m = cfg.model
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 1024, 24, 16, 4096
    return cfg


@preset
def text_tiny() -> D2vConfig:
    """2 blocks of 64 over 128-token blocks and a 2,000-piece vocabulary (the demo tokenizer)."""
    cfg = text_base()
    cfg.name = "text_tiny"
    m = cfg.model
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 64, 2, 4, 128
    m.text.vocab_size, m.text.max_positions = 2_000, 128
    cfg.teacher.top_k = 2
    # The base schedule's decays: with 0.99 (audio_tiny's) the layer-normed text targets collapse
    # within 200 steps (target std 0.01 on the demo corpus); 0.999 -> 0.9999 keeps them near 0.7.
    cfg.teacher.ema_start, cfg.teacher.ema_end, cfg.teacher.ema_anneal_steps = 0.999, 0.9999, 300
    cfg.loss.guard_after = 150
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 30
    cfg.train.max_steps, cfg.train.micro_batch_size, cfg.train.save_every = 300, 16, 100
    cfg.data.num_workers = 0
    return cfg
