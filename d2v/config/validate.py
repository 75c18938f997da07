"""Checks a D2vConfig for values that contradict each other; messages say what to change."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d2v.config.schema import D2vConfig

MODALITIES = ("audio", "image", "text")
MASKS = {"audio": ("span",), "image": ("block_2d",), "text": ("text_span", "bert")}
NORMS = ("instance", "layer", None)


def _problems(cfg: "D2vConfig") -> list[str]:
    p: list[str] = []
    m, t, mk, lo, o, tr = cfg.model, cfg.teacher, cfg.masking, cfg.loss, cfg.optim, cfg.train
    if m.modality not in MODALITIES:
        p.append(f"model.modality={m.modality!r} is not available; use one of {MODALITIES}")
    if m.embed_dim % m.num_heads:
        p.append(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    if m.modality == "audio" and m.embed_dim % m.audio.conv_pos_groups:
        p.append(f"model.embed_dim={m.embed_dim} is not divisible by model.audio.conv_pos_groups={m.audio.conv_pos_groups}")
    for name in ("dropout", "attention_dropout", "activation_dropout", "feature_dropout", "layerdrop"):
        v = getattr(m, name)
        if not 0.0 <= v < 1.0:
            p.append(f"model.{name}={v} must be in [0, 1)")
    if m.head not in ("linear", "mlp"):
        p.append(f"model.head={m.head!r}: use linear or mlp")
    if not 1 <= t.top_k <= m.depth:
        p.append(f"teacher.top_k={t.top_k} must be between 1 and model.depth={m.depth}")
    if t.layer_norm not in NORMS or t.final_norm not in NORMS:
        p.append(f"teacher.layer_norm/final_norm must be one of {NORMS}")
    if t.tap not in ("ffn", "block"):
        p.append(f"teacher.tap={t.tap!r}: use ffn or block")
    if t.input not in ("features", "source"):
        p.append(f"teacher.input={t.input!r}: use features or source")
    if t.offload not in ("none", "cpu"):
        p.append(f"teacher.offload={t.offload!r}: use none or cpu")
    if not 0.0 <= t.ema_start <= t.ema_end <= 1.0:
        p.append(f"need 0 <= teacher.ema_start ({t.ema_start}) <= teacher.ema_end ({t.ema_end}) <= 1")
    if t.ema_anneal_steps < 0:
        p.append("teacher.ema_anneal_steps must be >= 0")
    if mk.kind not in MASKS.get(m.modality, ()):
        p.append(f"masking.kind={mk.kind!r} does not fit model.modality={m.modality!r}; use one of {MASKS.get(m.modality)}")
    if m.modality == "image":
        im = m.image
        if im.image_size % im.patch_size:
            p.append(f"model.image.image_size={im.image_size} is not a multiple of model.image.patch_size={im.patch_size}")
        elif not 0 <= mk.num_mask_patches <= (im.image_size // im.patch_size) ** 2:
            p.append(f"masking.num_mask_patches={mk.num_mask_patches} exceeds the {(im.image_size // im.patch_size) ** 2} patches")
        if t.input != "source":
            p.append("image models need teacher.input=source (the teacher has its own patch embedding)")
    if m.modality == "text" and not 0 <= m.text.pad_id < m.text.vocab_size:
        p.append(f"model.text.pad_id={m.text.pad_id} is outside the vocabulary of {m.text.vocab_size}")
    if mk.random_token_prob + mk.leave_unmasked_prob > 1:
        p.append("masking.random_token_prob + masking.leave_unmasked_prob must be <= 1")
    if not 0.0 <= mk.mask_prob <= 1.0:
        p.append(f"masking.mask_prob={mk.mask_prob} must be in [0, 1]")
    if mk.mask_length < 1:
        p.append("masking.mask_length must be >= 1")
    if mk.equalize not in ("min", "target", None):
        p.append(f"masking.equalize={mk.equalize!r}: use min, target or null")
    if lo.kind not in ("l2", "smooth_l1"):
        p.append(f"loss.kind={lo.kind!r}: use l2 or smooth_l1")
    if lo.kind == "smooth_l1" and lo.beta <= 0:
        p.append("loss.kind=smooth_l1 needs loss.beta > 0 (or use loss.kind=l2)")
    if lo.reduction not in ("sum_per_position", "mean"):
        p.append(f"loss.reduction={lo.reduction!r}: use sum_per_position or mean")
    if o.schedule not in ("tri_stage", "cosine", "constant"):
        p.append(f"optim.schedule={o.schedule!r}: use tri_stage, cosine or constant")
    if o.schedule == "tri_stage" and abs(sum(o.phase_ratios) - 1.0) > 1e-6:
        p.append(f"optim.phase_ratios={o.phase_ratios} must sum to 1")
    if o.lr <= 0:
        p.append("optim.lr must be > 0")
    if o.clip_norm < 0:
        p.append("optim.clip_norm must be >= 0 (0 disables clipping)")
    if tr.precision not in ("bf16", "fp16", "fp32"):
        p.append(f"train.precision={tr.precision!r}: use bf16, fp16 or fp32")
    if tr.max_steps < 1 or tr.micro_batch_size < 1 or tr.grad_accum < 1:
        p.append("train.max_steps, train.micro_batch_size and train.grad_accum must be >= 1")
    if tr.wandb not in ("disabled", "offline", "online"):
        p.append(f"train.wandb={tr.wandb!r}: use disabled, offline or online")
    d = cfg.data
    if d.min_sample_size > d.max_sample_size:
        p.append(f"data.min_sample_size={d.min_sample_size} exceeds data.max_sample_size={d.max_sample_size}")
    if d.max_samples_per_batch < d.min_sample_size:
        p.append(f"data.max_samples_per_batch={d.max_samples_per_batch} cannot hold one utterance of data.min_sample_size={d.min_sample_size}")
    return p


def validate(cfg: "D2vConfig") -> None:
    problems = _problems(cfg)
    if problems:
        raise ValueError(f"invalid config {cfg.name!r}:\n  - " + "\n  - ".join(problems))
