"""Presets as Python functions: `audio_large()` starts from `audio_base()` and changes what differs.

Every number of a base/large preset comes from the reference configuration named in its docstring
(fairseq's `examples/data2vec/config/...`, data2vec_vision's `beit/README.md` commands) or the paper;
docs/method.md (section "Presets") lists them with their sources and tests/test_presets.py holds them.
`train.reference_batch` / `train.reference_gpus` give the reference run's global batch and GPU count;
d2v.config.batch_plan derives the per-rank batch and accumulation at other world sizes. Tiny presets
reproduce no reference run (reference_batch 0) and keep their per-rank batches.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from d2v.config.schema import D2vConfig

_PRESETS: dict[str, Callable[[], D2vConfig]] = {}


def preset(fn: Callable[[], D2vConfig]) -> Callable[[], D2vConfig]:
    _PRESETS[fn.__name__] = fn
    return fn


@preset
def audio_base() -> D2vConfig:
    """data2vec 1.0 speech Base: 12x768, LibriSpeech 960h (fairseq `examples/data2vec/config/audio/
    pretraining/base_librispeech.yaml`): 3.8 M samples per GPU x 16 GPUs = 60.8 M samples (63 min) per update."""
    cfg = D2vConfig(name="audio_base")
    # The schema's defaults are this preset; spell out the recipe-defining ones for readers.
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads, cfg.model.ffn_dim = 768, 12, 12, 3072
    cfg.teacher.top_k, cfg.teacher.layer_norm, cfg.teacher.final_norm = 8, "instance", None
    cfg.optim.lr, cfg.optim.schedule, cfg.train.max_steps = 5e-4, "tri_stage", 400_000
    # fairseq's tri_stage default final_lr_scale (0.01), not overridden by the yaml.
    cfg.optim.final_lr_scale = 0.01
    cfg.data.max_samples_per_batch = 3_800_000
    # Batches cut to a multiple of 0.25 s (the reference crops to the shortest utterance): at most 80
    # batch lengths, about 160 (B, T) shapes per epoch instead of 780, for 1 % less audio
    # (benchmarks/audio_shapes.py; docs/method.md §12).
    cfg.data.length_multiple = 4_000
    cfg.train.reference_batch, cfg.train.reference_gpus = 60_800_000, 16
    return cfg


@preset
def audio_large() -> D2vConfig:
    """data2vec 1.0 speech Large: 24x1024, 16 heads, FFN 4096 (the paper's Large, pretrained on Libri-light).

    The architecture is the paper's (section 4); fairseq ships no 1.0 Large speech config and the paper
    states no Large training settings, so those are audio_base's (K=8, the schedule, 3.8 M samples per
    GPU) and the preset reproduces no reference run (reference_batch 0). docs/method.md section 9 gives
    the source of each number.
    """
    cfg = audio_base()
    cfg.name = "audio_large"
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads, cfg.model.ffn_dim = 1024, 24, 16, 4096
    cfg.teacher.top_k = 8
    cfg.train.reference_batch, cfg.train.reference_gpus = 0, 0
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
    cfg.train.reference_batch, cfg.train.reference_gpus = 0, 0
    cfg.train.log_every = 10
    cfg.train.save_every = 100
    cfg.data.min_sample_size = 8_000
    cfg.data.max_sample_size = 48_000
    cfg.data.length_multiple = 0  # the demo's few batches: the reference's crop
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


# Where a run wrote and what it read: not part of the method a directory hands on.
_RUN_LOCATION = ("train.out_dir", "data.train_shards", "data.val_shards")


def find_directory_config(directory: str) -> D2vConfig | None:
    """The config a `python -m d2v export` or `import-fairseq` directory was written with: config.json
    of the plain layout, d2v_export.json of the transformers one; None for a directory without one
    (public transformers weights). Its run location is reset. Not validated."""
    from d2v.config.overrides import from_dict, set_value

    for name, key in (("d2v_export.json", "d2v_config"), ("config.json", None)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or (key is None and "model_type" in data):
            continue  # a transformers config.json
        if key is not None:
            if key not in data:
                continue
            data = data[key]
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a d2v config (a JSON object)")
        cfg = from_dict(data)
        fresh = D2vConfig()
        for dotted in _RUN_LOCATION:
            section, name_ = dotted.split(".")
            set_value(cfg, dotted, getattr(getattr(fresh, section), name_))
        return cfg
    return None


def directory_config(directory: str) -> D2vConfig:
    cfg = find_directory_config(directory)
    if cfg is None:
        raise ValueError(f"{directory} holds no d2v config (config.json of `python -m d2v export` or import-fairseq, "
                         f"or d2v_export.json): for public transformers weights, pass a preset and "
                         f"--init-from {directory}")
    return cfg


def base_config(source: str) -> D2vConfig:
    """A preset by name, or the method of an export / import directory (a path to one)."""
    if os.path.isdir(source):
        return directory_config(source)
    return get_preset(source)


@preset
def image_base() -> D2vConfig:
    """data2vec 1.0 vision Base: BEiT-style ViT-B/16, the ViT-B pretraining command of data2vec_vision's
    `beit/README.md` (run_cyclical.py): 128 images per GPU x 16 GPUs, 800 epochs, warmup 10 epochs."""
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
    # BEiT's optimizer also exempts the CLS token from weight decay (the factory marks it).
    o.lr, o.betas, o.eps, o.weight_decay, o.no_decay_1d = 2e-3, (0.9, 0.999), 1e-8, 0.05, True
    # 2,048 images per update: 625 updates per ImageNet epoch (1,281,167 // 128 // 16); warmup 10
    # epochs, 800 epochs.
    o.schedule, o.warmup_steps, o.min_lr, o.clip_norm = "cosine", 6_250, 1e-5, 3.0
    cfg.train.max_steps, cfg.train.micro_batch_size = 500_000, 128
    cfg.train.reference_batch, cfg.train.reference_gpus = 2_048, 16
    return cfg


@preset
def image_large() -> D2vConfig:
    """data2vec 1.0 vision Large, first phase: ViT-L/16 (layer scale 1e-5, drop path 0.2, attention dropout
    0.15), the first ViT-L command of data2vec_vision's `beit/README.md`: 64 images per GPU x 64 GPUs,
    800 epochs, warmup 80 epochs, tau 0.9998. The paper's ViT-L continues with `image_large_phase2`."""
    cfg = image_base()
    cfg.name = "image_large"
    m = cfg.model
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 1024, 24, 16, 4096
    m.attention_dropout, m.image.layer_scale_init, m.image.drop_path = 0.15, 1e-5, 0.2
    cfg.optim.lr = 1e-3
    # 4,096 images per update: 312 updates per epoch (1,281,167 // 64 // 64).
    cfg.optim.warmup_steps, cfg.train.max_steps = 80 * 312, 800 * 312
    cfg.train.micro_batch_size = 64
    cfg.train.reference_batch, cfg.train.reference_gpus = 4_096, 64
    return cfg


@preset
def image_large_phase2() -> D2vConfig:
    """data2vec 1.0 vision Large, second phase (`beit/README.md`, "another 800 epochs with constant ema
    decay"): start with `--init-from` the first phase's exported student (the teacher starts as its copy),
    tau 0.9999 from the first update, warmup 40 epochs, 800 more epochs."""
    cfg = image_large()
    cfg.name = "image_large_phase2"
    cfg.teacher.ema_start = cfg.teacher.ema_end = 0.9999
    cfg.optim.warmup_steps = 40 * 312
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
    cfg.train.reference_batch, cfg.train.reference_gpus = 0, 0
    cfg.data.num_workers = 0
    return cfg


@preset
def text_base() -> D2vConfig:
    """data2vec 1.0 text Base: RoBERTa-base layout, span masking of <mask> (fairseq `examples/data2vec/config/
    text/pretraining/base.yaml`): 8,192 tokens (16 sequences of 512) per GPU x 16 GPUs, 1 M updates."""
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
    # The paper's 100k anneal (section 4.3); the yaml has 300k. The paper describes the reported runs.
    t.ema_start, t.ema_end, t.ema_anneal_steps = 0.999, 0.9999, 100_000
    lo = cfg.loss
    lo.kind, lo.beta, lo.scale, lo.reduction = "smooth_l1", 4.0, 1.0, "sum_per_position"
    o = cfg.optim
    o.lr, o.betas, o.eps, o.weight_decay = 2e-4, (0.9, 0.98), 1e-6, 0.01
    o.schedule, o.warmup_steps, o.clip_norm = "cosine", 10_000, 5.0
    cfg.train.max_steps, cfg.train.micro_batch_size = 1_000_000, 16
    cfg.train.reference_batch, cfg.train.reference_gpus = 256, 16
    return cfg


@preset
def text_large() -> D2vConfig:
    """data2vec 1.0 text Large: 24x1024, 16 heads, FFN 4096 (RoBERTa-large layout).

    The architecture is the paper's Large (section 4); the paper reports text Base only and fairseq ships
    no Large 1.0 text config, so everything else is text_base's and the preset reproduces no reference run
    (reference_batch 0). docs/method.md section 9 gives the source of each number.
    """
    cfg = text_base()
    cfg.name = "text_large"
    m = cfg.model
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 1024, 24, 16, 4096
    cfg.train.reference_batch, cfg.train.reference_gpus = 0, 0
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
    cfg.train.reference_batch, cfg.train.reference_gpus = 0, 0
    cfg.data.num_workers = 0
    return cfg


# -- data2vec 2.0 (fairseq `examples/data2vec/config/v2/*.yaml`) ------------------------------------


def _v2_optim(cfg: D2vConfig, lr: float, warmup: int, max_steps: int) -> None:
    """2.0 recipes: cosine with warmup, no weight decay on biases and other 1-D parameters."""
    o = cfg.optim
    o.lr, o.schedule, o.warmup_steps, o.no_decay_1d, o.min_lr = lr, "cosine", warmup, True, 0.0
    cfg.train.max_steps = max_steps


@preset
def audio_base_v2() -> D2vConfig:
    """data2vec 2.0 speech Base: 12x768 post-LN with ALiBi, M=8 masks of 1-D blocks, conv decoder 4x384 k7
    (`v2/base_audio_only_task.yaml`): 1.0 M samples per GPU x 8 GPUs per update, 400k updates."""
    cfg = audio_base()
    cfg.name = "audio_base_v2"
    m, v = cfg.model, cfg.model.v2
    m.dropout, m.attention_dropout, m.activation_dropout, m.layerdrop = 0.1, 0.1, 0.0, 0.05
    v.enabled, v.num_masks, v.prenet_depth, v.alibi = True, 8, 0, True
    v.decoder_dim, v.decoder_kernel, v.decoder_layers, v.decoder_groups = 384, 7, 4, 16
    v.decoder_residual, v.decoder_projection_layers, v.decoder_input_dropout = True, 1, 0.1
    mk = cfg.masking
    mk.kind, mk.mask_prob, mk.block_width, mk.mask_adjust = "block_1d", 0.5, 5, 0.05
    t = cfg.teacher
    # EMA of the positional conv (averaged in 2.0), ALiBi scales, LayerNorm, prenet and blocks;
    # the teacher consumes the student's CNN features, so it has no CNN of its own.
    t.ema_modules, t.copy_modules, t.input = ("encoder",), (), "features"
    t.top_k, t.tap, t.layer_norm, t.final_norm = 8, "ffn", "instance", None
    t.ema_start, t.ema_end, t.ema_anneal_steps = 0.999, 0.99999, 75_000
    cfg.loss.kind, cfg.loss.scale, cfg.loss.reduction = "l2", None, "sum_per_position"
    _v2_optim(cfg, 7.5e-4, 8_000, 400_000)
    cfg.data.max_samples_per_batch = 1_000_000
    cfg.train.reference_batch, cfg.train.reference_gpus = 8_000_000, 8
    return cfg


@preset
def audio_large_v2() -> D2vConfig:
    """data2vec 2.0 speech Large: 8 prenet + 16 main blocks x1024, 16 heads, M=12, R=0.55
    (`v2/large_audio_only_task.yaml`): 320k samples per GPU x 48 GPUs per update, 600k updates."""
    cfg = audio_base_v2()
    cfg.name = "audio_large_v2"
    m, v = cfg.model, cfg.model.v2
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 1024, 16, 16, 4096
    m.layerdrop = 0.0  # prenet too (prenet_layerdrop: 0)
    v.prenet_depth, v.num_masks, v.decoder_dim = 8, 12, 768
    cfg.masking.mask_prob, cfg.masking.mask_adjust = 0.55, 0.10
    t = cfg.teacher
    t.top_k, t.ema_start, t.ema_end, t.ema_anneal_steps = 16, 0.9997, 1.0, 300_000
    _v2_optim(cfg, 4e-4, 10_000, 600_000)
    cfg.optim.clip_norm = 1.0
    cfg.data.max_samples_per_batch = 320_000
    cfg.train.reference_batch, cfg.train.reference_gpus = 15_360_000, 48
    return cfg


@preset
def audio_tiny_v2() -> D2vConfig:
    """audio_tiny's sizes in the 2.0 mode: M=4, a 2-layer decoder of 32; trains on the demo speech."""
    cfg = audio_base_v2()
    tiny = audio_tiny()
    cfg.name = "audio_tiny_v2"
    cfg.data, cfg.train = tiny.data, tiny.train
    m, v = cfg.model, cfg.model.v2
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 64, 2, 4, 128
    m.audio.conv_layers, m.layerdrop = tiny.model.audio.conv_layers, 0.0
    v.num_masks, v.decoder_dim, v.decoder_layers = 4, 32, 2
    t = cfg.teacher
    t.top_k, t.ema_start, t.ema_end, t.ema_anneal_steps = 2, 0.999, 0.9999, 300
    cfg.loss.guard_after = 150
    _v2_optim(cfg, 1e-3, 30, 300)
    return cfg


@preset
def image_base_v2() -> D2vConfig:
    """data2vec 2.0 vision Base: ViT-B/16 post-LN, sin-cos positions, 2 prenet + 10 main blocks, CLS loss,
    M=16 inverse-block masks keeping 39 of 196 patches, 2-D conv decoder 6x768 k3 (`v2/base_images_only_task.yaml`):
    16 images per GPU x 16 GPUs per update, 375,300 updates (75 epochs), warmup 50,040."""
    cfg = image_base()
    cfg.name = "image_base_v2"
    m, v = cfg.model, cfg.model.v2
    m.depth, m.layer_norm_first, m.norm_eps = 10, False, 1e-6
    m.dropout, m.attention_dropout, m.activation_dropout, m.layerdrop = 0.0, 0.0, 0.0, 0.0
    m.image.rel_pos_bias, m.image.layer_scale_init, m.image.drop_path = False, 0.0, 0.0
    # MAE's augmentation (`examples/data2vec/data/mae_image_dataset.py`): crop scale 0.2-1, flip, no jitter.
    m.image.crop_scale, m.image.color_jitter = (0.2, 1.0), 0.0
    v.enabled, v.num_masks, v.prenet_depth = True, 16, 2
    v.sincos_positions, v.cls_token, v.cls_loss = True, True, 0.01
    v.decoder_dim, v.decoder_kernel, v.decoder_layers, v.decoder_groups = 768, 3, 6, 16
    v.decoder_residual, v.decoder_projection_layers, v.decoder_input_dropout = True, 1, 0.0
    mk = cfg.masking
    mk.kind, mk.mask_prob, mk.block_width, mk.mask_adjust = "inverse_block_2d", 0.8, 3, 0.07
    t = cfg.teacher
    # EMA of everything but the decoder, patch embedding and CLS included (the sin-cos table is a buffer).
    t.ema_modules, t.copy_modules, t.input = ("frontend", "encoder"), (), "source"
    t.top_k, t.tap, t.layer_norm, t.final_norm = 10, "ffn", "instance", "layer"
    t.ema_start, t.ema_end, t.ema_anneal_steps = 0.9998, 0.99999, 100_000
    cfg.loss.kind, cfg.loss.beta, cfg.loss.scale, cfg.loss.reduction = "l2", 0.0, None, "sum_per_position"
    o = cfg.optim
    o.betas, o.eps, o.weight_decay, o.clip_norm = (0.9, 0.95), 1e-8, 0.05, 4.0
    _v2_optim(cfg, 1e-3, 50_040, 375_300)
    cfg.train.micro_batch_size = 16
    cfg.train.reference_batch, cfg.train.reference_gpus = 256, 16
    return cfg


@preset
def image_large_v2() -> D2vConfig:
    """data2vec 2.0 vision Large: ViT-L/16, K=18 of 24, keep 49 patches, decoder 3x1024 k5
    (`v2/large_images_only_task.yaml`): 8 images per GPU x 16 GPUs per update, 375,300 updates."""
    cfg = image_base_v2()
    cfg.name = "image_large_v2"
    m, v = cfg.model, cfg.model.v2
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 1024, 24, 16, 4096
    v.prenet_depth, v.decoder_dim, v.decoder_kernel, v.decoder_layers = 0, 1024, 5, 3
    cfg.masking.mask_prob, cfg.masking.mask_adjust = 0.75, 0.10
    t = cfg.teacher
    t.top_k, t.ema_start, t.ema_end, t.ema_anneal_steps = 18, 0.9998, 0.99999, 150_000
    cfg.optim.lr = 4e-4
    cfg.train.micro_batch_size = 8
    cfg.train.reference_batch, cfg.train.reference_gpus = 128, 16
    return cfg


@preset
def image_tiny_v2() -> D2vConfig:
    """image_tiny's 32x32 images (64 patches, 12 kept) with 1 prenet + 3 main blocks of 64, M=4."""
    cfg = image_base_v2()
    tiny = image_tiny()
    cfg.name = "image_tiny_v2"
    cfg.data, cfg.train = tiny.data, tiny.train
    m, v = cfg.model, cfg.model.v2
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 64, 3, 4, 128
    m.image.image_size, m.image.patch_size = 32, 4
    v.num_masks, v.prenet_depth, v.decoder_dim, v.decoder_layers = 4, 1, 64, 2
    t = cfg.teacher
    t.top_k, t.ema_start, t.ema_end, t.ema_anneal_steps = 3, 0.998, 0.9999, 300
    cfg.optim.clip_norm = 4.0
    _v2_optim(cfg, 1e-3, 30, 300)
    cfg.optim.min_lr = 1e-5
    return cfg


@preset
def text_base_v2() -> D2vConfig:
    """data2vec 2.0 text Base: RoBERTa-base layout, M=8 random 48% masks (dropped, no <mask>), conv decoder
    5x768 k9 without groups or residuals and a 2-layer projection (`v2/base_text_only_task.yaml`): 4 sequences
    of 512 per GPU x 16 GPUs per update, 1 M updates."""
    cfg = text_base()
    cfg.name = "text_base_v2"
    v = cfg.model.v2
    v.enabled, v.num_masks, v.prenet_depth = True, 8, 0
    v.decoder_dim, v.decoder_kernel, v.decoder_layers, v.decoder_groups = 768, 9, 5, 1
    v.decoder_residual, v.decoder_projection_layers, v.decoder_input_dropout = False, 2, 0.1
    cfg.masking.kind, cfg.masking.mask_prob = "random", 0.48
    t = cfg.teacher
    # EMA of the blocks only; the teacher consumes the student's embedding of the clean tokens
    # without the embedding dropout (the reference applies it to the teacher's input too).
    t.ema_modules, t.copy_modules, t.input = ("encoder.blocks",), (), "features"
    t.top_k, t.tap, t.layer_norm, t.final_norm = 12, "ffn", "instance", None
    t.ema_start, t.ema_end, t.ema_anneal_steps = 0.9999, 0.99999, 100_000
    cfg.loss.kind, cfg.loss.beta, cfg.loss.scale, cfg.loss.reduction = "l2", 0.0, 1.0, "sum_per_position"
    cfg.optim.clip_norm = 1.0
    _v2_optim(cfg, 2e-4, 4_000, 1_000_000)
    cfg.train.micro_batch_size = 4
    cfg.train.reference_batch, cfg.train.reference_gpus = 64, 16
    return cfg


@preset
def text_large_v2() -> D2vConfig:
    """data2vec 2.0 text Large: 24x1024, 16 heads; LN per layer then IN after averaging, K=24, random 50% masks
    (`v2/large_text_only_task.yaml`): 2 sequences of 512 per GPU x 32 GPUs per update, 600k updates."""
    cfg = text_base_v2()
    cfg.name = "text_large_v2"
    m = cfg.model
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 1024, 24, 16, 4096
    t = cfg.teacher
    t.top_k, t.layer_norm, t.final_norm = 24, "layer", "instance"
    cfg.masking.mask_prob = 0.5
    cfg.optim.lr, cfg.train.max_steps = 1e-4, 600_000
    cfg.train.micro_batch_size = 2
    cfg.train.reference_batch, cfg.train.reference_gpus = 64, 32
    return cfg


@preset
def text_tiny_v2() -> D2vConfig:
    """text_tiny's sizes (2 blocks of 64, 128 tokens, 2,000 pieces) in the 2.0 mode: M=4, decoder 2x64 k9."""
    cfg = text_base_v2()
    tiny = text_tiny()
    cfg.name = "text_tiny_v2"
    cfg.data, cfg.train = tiny.data, tiny.train
    m, v = cfg.model, cfg.model.v2
    m.embed_dim, m.depth, m.num_heads, m.ffn_dim = 64, 2, 4, 128
    m.text.vocab_size, m.text.max_positions = 2_000, 128
    v.num_masks, v.decoder_dim, v.decoder_layers = 4, 64, 2
    t = cfg.teacher
    t.top_k, t.ema_start, t.ema_end, t.ema_anneal_steps = 2, 0.999, 0.9999, 300
    cfg.loss.guard_after = 150
    _v2_optim(cfg, 1e-3, 30, 300)
    cfg.optim.clip_norm = 1.0
    return cfg
