"""Checks a D2vConfig for values that contradict each other; messages say what to change.

Imports nothing from the schema (the schema calls it): `cfg` is a d2v.config.schema.D2vConfig."""
from __future__ import annotations

from d2v.config.mask_kinds import MASK_KINDS, mask_config
from d2v.config.modalities import SPECS
from d2v.config.choices import CHOICES

MODALITIES = tuple(SPECS)
MASKS = {name: spec.masks for name, spec in SPECS.items()}
MASKS_V2 = {name: spec.masks_v2 for name, spec in SPECS.items()}
TEACHER_INPUT_V2 = {name: spec.teacher_input_v2 for name, spec in SPECS.items()}


def _choice_problems(cfg: "D2vConfig") -> list[str]:
    p = []
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            names = ", ".join("null" if a is None else str(a) for a in allowed)
            p.append(f"{key}={value!r}: use one of {names}")
    return p


def _problems(cfg: "D2vConfig") -> list[str]:
    p: list[str] = []
    m, t, mk, lo, o, tr = cfg.model, cfg.teacher, cfg.masking, cfg.loss, cfg.optim, cfg.train
    if m.modality not in MODALITIES:
        p.append(f"model.modality={m.modality!r} is not available; use one of {MODALITIES}")
    p.extend(_choice_problems(cfg))
    if m.embed_dim % m.num_heads:
        p.append(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    for name in ("dropout", "attention_dropout", "activation_dropout", "feature_dropout", "layerdrop"):
        v = getattr(m, name)
        if not 0.0 <= v < 1.0:
            p.append(f"model.{name}={v} must be in [0, 1)")
    if not 1 <= t.top_k <= m.depth:
        p.append(f"teacher.top_k={t.top_k} must be between 1 and model.depth={m.depth}")
    if not 0.0 <= t.ema_start <= t.ema_end <= 1.0:
        p.append(f"need 0 <= teacher.ema_start ({t.ema_start}) <= teacher.ema_end ({t.ema_end}) <= 1")
    if t.ema_anneal_steps < 0:
        p.append("teacher.ema_anneal_steps must be >= 0")
    allowed = (MASKS_V2 if m.v2.enabled else MASKS).get(m.modality, ())
    if mk.kind not in allowed:
        needs_v2 = not m.v2.enabled and mk.kind in MASKS_V2.get(m.modality, ())
        hint = " (2.0 masks need model.v2.enabled=true)" if needs_v2 else ""
        p.append(f"masking.kind={mk.kind!r} does not fit model.modality={m.modality!r} "
                 f"{'with' if m.v2.enabled else 'without'} model.v2.enabled; use one of {allowed}{hint}")
    if m.v2.enabled:
        p.extend(_v2_problems(cfg))
    if m.modality in SPECS:
        p.extend(SPECS[m.modality].checks(cfg))
    if mk.kind in MASK_KINDS:
        p.extend(mask_config(mk).problems())
    if lo.kind == "smooth_l1" and lo.beta <= 0:
        p.append("loss.kind=smooth_l1 needs loss.beta > 0 (or use loss.kind=l2)")
    if o.schedule == "tri_stage" and abs(sum(o.phase_ratios) - 1.0) > 1e-6:
        p.append(f"optim.phase_ratios={o.phase_ratios} must sum to 1")
    if o.lr <= 0:
        p.append("optim.lr must be > 0")
    if o.clip_norm < 0:
        p.append("optim.clip_norm must be >= 0 (0 disables clipping)")
    if tr.max_steps < 1 or tr.micro_batch_size < 1 or tr.grad_accum < 1:
        p.append("train.max_steps, train.micro_batch_size and train.grad_accum must be >= 1")
    if tr.reference_batch < 0 or (tr.reference_batch > 0 and tr.reference_gpus < 1):
        p.append(f"train.reference_batch={tr.reference_batch} needs train.reference_gpus >= 1 "
                 f"(got {tr.reference_gpus}); set train.reference_batch=0 for a run that reproduces no reference")
    im = cfg.model.image
    if not 0 < im.crop_scale[0] <= im.crop_scale[1] <= 1:
        p.append(f"model.image.crop_scale={im.crop_scale}: need 0 < low <= high <= 1 (area fractions)")
    if im.color_jitter < 0:
        p.append(f"model.image.color_jitter={im.color_jitter} must be >= 0 (0 disables)")
    d = cfg.data
    if d.min_sample_size > d.max_sample_size:
        p.append(f"data.min_sample_size={d.min_sample_size} exceeds data.max_sample_size={d.max_sample_size}")
    if d.length_multiple < 0 or (d.length_multiple and d.pad):
        p.append(f"data.length_multiple={d.length_multiple} rounds cropped batches: it must be >= 0 and needs "
                 f"data.pad=false (padded batches are budgeted at their longest length); with data.pad=true "
                 f"set data.length_multiple=0")
    if d.max_samples_per_batch < d.min_sample_size:
        p.append(f"data.max_samples_per_batch={d.max_samples_per_batch} cannot hold one utterance of data.min_sample_size={d.min_sample_size}")
    return p


def _v2_problems(cfg: "D2vConfig") -> list[str]:
    """Contradictions specific to data2vec 2.0 (model.v2.enabled)."""
    p: list[str] = []
    m, v, t = cfg.model, cfg.model.v2, cfg.teacher
    if v.num_masks < 1:
        p.append(f"model.v2.num_masks={v.num_masks} must be >= 1")
    if v.prenet_depth < 0:
        p.append(f"model.v2.prenet_depth={v.prenet_depth} must be >= 0")
    if m.layer_norm_first:
        p.append("data2vec 2.0 blocks are post-LN: set model.layer_norm_first=false")
    if v.alibi and not _has_option(m.modality, "alibi"):
        p.append(f"model.v2.alibi is for {_with_option('alibi')} only (model.modality={m.modality!r}): "
                 f"set model.v2.alibi=false")
    if v.alibi and v.cls_token:
        p.append("model.v2.alibi and model.v2.cls_token cannot be combined (ALiBi positions have no CLS slot)")
    if v.sincos_positions and not _has_option(m.modality, "sincos_positions"):
        p.append(f"model.v2.sincos_positions is for {_with_option('sincos_positions')} models only")
    elif v.sincos_positions and m.embed_dim % 4:
        p.append(f"2-D sin-cos positions need model.embed_dim divisible by 4, got {m.embed_dim}")
    if v.cls_loss > 0 and not v.cls_token:
        p.append(f"model.v2.cls_loss={v.cls_loss} needs model.v2.cls_token=true")
    if v.cls_loss < 0 or v.mask_noise_std < 0:
        p.append("model.v2.cls_loss and model.v2.mask_noise_std must be >= 0")
    if v.decoder_dim < 1 or v.decoder_layers < 0 or v.decoder_kernel < 1:
        p.append("model.v2.decoder_dim, decoder_kernel must be >= 1 and decoder_layers >= 0")
    elif v.decoder_kernel % 2 == 0:
        p.append(f"model.v2.decoder_kernel={v.decoder_kernel} must be odd (same-length convs)")
    for name, width in (("model.embed_dim", m.embed_dim), ("model.v2.decoder_dim", v.decoder_dim)):
        if v.decoder_groups < 1 or width % v.decoder_groups:
            p.append(f"{name}={width} is not divisible by model.v2.decoder_groups={v.decoder_groups}")
    if v.decoder_projection_layers not in (1, 2):
        p.append(f"model.v2.decoder_projection_layers={v.decoder_projection_layers}: use 1 or 2")
    if not 0.0 <= v.decoder_input_dropout < 1.0:
        p.append(f"model.v2.decoder_input_dropout={v.decoder_input_dropout} must be in [0, 1)")
    want = TEACHER_INPUT_V2.get(m.modality)
    if want is not None and t.input != want:
        p.append(f"2.0 {m.modality} teachers need teacher.input={want}")
    if t.tap != "ffn":
        p.append("2.0 targets are the blocks' FFN outputs: set teacher.tap=ffn")
    return p


def _has_option(modality: str, option: str) -> bool:
    return modality in SPECS and option in SPECS[modality].v2_options


def _with_option(option: str) -> str:
    return " and ".join(name for name, spec in SPECS.items() if option in spec.v2_options)


def validate(cfg: "D2vConfig") -> None:
    problems = _problems(cfg)
    if problems:
        raise ValueError(f"invalid config {cfg.name!r}:\n  - " + "\n  - ".join(problems))
