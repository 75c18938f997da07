"""The training method a fairseq data2vec checkpoint was pretrained with, as d2v settings: its
teacher (top-K, EMA schedule, target norms), loss, LayerDrop, dropouts, masks and clones, each
read from the config section that owns it (the model section; never the first match anywhere in
the tree, where another modality's defaults sit). What the checkpoint sets and d2v cannot
represent is named in the import notes; the rest of the recipe comes from the nearest preset.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from d2v.config.overrides import set_value


def _optional_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _target_layer_norm(section: dict[str, Any]) -> str | None:
    return "instance" if section.get("instance_norm_target_layer") else (
        "layer" if section.get("layer_norm_target_layer") else None)


def _final_norm(section: dict[str, Any]) -> str | None:
    return "instance" if section.get("instance_norm_targets") else (
        "layer" if section.get("layer_norm_targets") else None)


Reader = tuple[str, str, Callable[[Any], Any]]
# (fairseq key of the model section, d2v key, conversion)
TEACHER_AND_LOSS: list[Reader] = [
    ("average_top_k_layers", "teacher.top_k", int), ("ema_decay", "teacher.ema_start", float),
    ("ema_end_decay", "teacher.ema_end", float), ("ema_anneal_end_step", "teacher.ema_anneal_steps", int),
    ("loss_beta", "loss.beta", float), ("loss_scale", "loss.scale", _optional_float),
]
# data2vec_audio (wav2vec 2.0's config beneath it)
AUDIO_V1: list[Reader] = [
    ("encoder_layerdrop", "model.layerdrop", float), ("dropout", "model.dropout", float),
    ("attention_dropout", "model.attention_dropout", float), ("activation_dropout", "model.activation_dropout", float),
    ("dropout_input", "model.feature_dropout", float), ("mask_prob", "masking.mask_prob", float),
    ("mask_length", "masking.mask_length", int),
]
# data2vec_multi
MULTI: list[Reader] = [("layerdrop", "model.layerdrop", float), ("clone_batch", "model.v2.num_masks", int)]
# Settings of these sections that change the method but have no d2v counterpart read here.
NOT_READ = {
    "text": (),
    "image": (),
    "audio": ("mask_channel_prob", "batch_norm_target_layer", "group_norm_target_layer", "mask_selection",
              "feature_grad_mult"),
    "multi": ("encoder_dropout", "post_mlp_drop", "attention_dropout", "activation_dropout", "dropout_input",
              "start_drop_path_rate", "end_drop_path_rate", "end_of_block_targets", "cls_loss",
              "batch_norm_target_layer", "group_norm_target_layer"),
    "multi_modality": ("mask_prob", "mask_length", "mask_prob_adjust", "inverse_mask", "mask_dropout",
                       "add_masks", "remove_masks", "keep_masked_pct"),
}
_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def _resolve(value: Any, tree: dict[str, Any]) -> Any:
    """omegaconf keeps `${optimization.max_update}` as text in a saved cfg: looked up in the tree."""
    m = _INTERPOLATION.match(value) if isinstance(value, str) else None
    if m is None:
        return value
    node: Any = tree
    for part in m.group(1).split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def apply_method(cfg: Any, section: dict[str, Any], tree: dict[str, Any], readers: list[Reader],
                 not_read: tuple[str, ...], where: str) -> list[str]:
    """Sets every reader's d2v key from `section` (the fairseq config section that owns it);
    returns notes: what was read, and what the checkpoint sets that d2v did not take."""
    taken, missing = [], []
    for key, target, convert in readers:
        if key not in section:
            continue
        value = _resolve(section[key], tree)
        if value is None and convert is not _optional_float:
            missing.append(f"{where}.{key} (unresolved {section[key]!r})")
            continue
        set_value(cfg, target, convert(value))
        taken.append(f"{target}={convert(value)!r} ({where}.{key})")
    if any(k in section for k in ("instance_norm_target_layer", "layer_norm_target_layer")):
        cfg.teacher.layer_norm = _target_layer_norm(section)
        taken.append(f"teacher.layer_norm={cfg.teacher.layer_norm!r}")
    if any(k in section for k in ("instance_norm_targets", "layer_norm_targets")):
        cfg.teacher.final_norm = _final_norm(section)
        taken.append(f"teacher.final_norm={cfg.teacher.final_norm!r}")
    set_here = [f"{where}.{k}={section[k]!r}" for k in not_read if k in section and section[k] not in (None, False, 0)]
    notes = [f"method read from the checkpoint: {', '.join(taken)}"] if taken else []
    if set_here or missing:
        notes.append(f"set in the checkpoint but not taken (d2v keeps preset {cfg.name}'s): "
                     f"{', '.join(set_here + missing)}")
    return notes


# The model section's own method settings per 1.0 layout (FAIRSEQ_LAYOUTS' names); BEiT's argparse
# names (data2vec_vision) are not read yet.
V1_READERS: dict[str, list[Reader]] = {"audio": TEACHER_AND_LOSS + AUDIO_V1, "text": TEACHER_AND_LOSS,
                                       "image": []}
