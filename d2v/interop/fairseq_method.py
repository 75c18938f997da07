"""The training method a reference data2vec checkpoint was pretrained with, as d2v settings: its
teacher (top-K, EMA schedule, target norms), loss, LayerDrop, dropouts, masks and clones, each
read from the config section that owns it (fairseq: the model section, the text task's masking,
a 2.0 modality's own section; data2vec_vision: its argparse namespace), never the first match
anywhere in the tree, where another modality's defaults sit. What the checkpoint sets and d2v
cannot represent is named in the import notes; the rest of the recipe comes from the nearest preset.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from d2v.config.mask_kinds import mask_config
from d2v.config.overrides import set_value

UNSET = object()  # a path the saved settings do not have (None is a value there)


def _optional_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _optional_int(v: Any) -> int | None:
    return None if v is None else int(v)


Reader = tuple[str, str, Callable[[Any], Any]]
"""(key in the owning section, dotted for nested ones; d2v key; conversion)."""


@dataclass
class SavedSection:
    """One owning section of the reference config and what d2v takes from it."""
    where: str
    """Its path in the reference config, for the notes."""
    values: dict[str, Any]
    readers: list[Reader] = field(default_factory=list)
    not_read: tuple[str, ...] = ()
    """Settings that change the method and have no d2v counterpart: noted when set (not 0/false/null)."""
    compared: tuple[tuple[str, str], ...] = ()
    """(key, d2v key) that d2v does not take from here: noted when the values differ."""
    target_norms: bool = False
    """Whether it holds fairseq's per-layer and final target-norm switches (the model section)."""


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
# data2vec_text: the encoder's TransformerConfig, and the masked_lm task, which owns the masking
TEXT_V1_TRANSFORMER: list[Reader] = [
    ("dropout", "model.dropout", float), ("attention_dropout", "model.attention_dropout", float),
    ("activation_dropout", "model.activation_dropout", float), ("encoder.layerdrop", "model.layerdrop", float),
]
TEXT_V1_TASK: list[Reader] = [
    ("mask_prob", "masking.mask_prob", float), ("mask_multiple_length", "masking.mask_length", int),
    ("random_token_prob", "masking.random_token_prob", float),
    ("leave_unmasked_prob", "masking.leave_unmasked_prob", float),
]
# data2vec_multi's model section
MULTI: list[Reader] = [
    ("layerdrop", "model.layerdrop", float), ("clone_batch", "model.v2.num_masks", int),
    ("encoder_dropout", "model.dropout", float), ("attention_dropout", "model.attention_dropout", float),
    ("activation_dropout", "model.activation_dropout", float), ("cls_loss", "model.v2.cls_loss", float),
]
# a data2vec_multi modality's own section; the block settings only where d2v's mask kind has them
V2_MODALITY: list[Reader] = [
    ("mask_prob", "masking.mask_prob", float), ("mask_noise_std", "model.v2.mask_noise_std", float),
    ("decoder.input_dropout", "model.v2.decoder_input_dropout", float),
]
V2_BLOCKS: list[Reader] = [("mask_length", "masking.block_width", int),
                           ("mask_prob_adjust", "masking.mask_adjust", float)]
NOT_READ = {
    "audio": ("mask_channel_prob", "batch_norm_target_layer", "group_norm_target_layer", "mask_selection",
              "feature_grad_mult"),
    "text": ("batch_norm_target_layer",),
    "text_task": ("mask_whole_words", "mask_stdev", "freq_weighted_replacement"),
    "multi": ("dropout_input", "start_drop_path_rate", "end_drop_path_rate", "end_of_block_targets",
              "batch_norm_target_layer", "group_norm_target_layer"),
    "multi_modality": ("mask_prob_min", "mask_dropout", "add_masks", "remove_masks", "keep_masked_pct",
                       "mask_channel_prob", "prenet_layerdrop", "start_drop_path_rate", "end_drop_path_rate"),
}
_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def lookup(tree: Any, path: str) -> Any:
    """The value at a dotted path of a saved settings tree, or UNSET."""
    node: Any = tree
    for part in path.split("."):
        node = node.get(part, UNSET) if isinstance(node, dict) else UNSET
    return node


def _resolve(value: Any, tree: dict[str, Any]) -> Any:
    """omegaconf keeps `${optimization.max_update}` as text in a saved cfg: looked up in the tree."""
    m = _INTERPOLATION.match(value) if isinstance(value, str) else None
    if m is None:
        return value
    found = lookup(tree, m.group(1))
    return None if found is UNSET else found


def _target_layer_norm(section: dict[str, Any]) -> str | None:
    return "instance" if section.get("instance_norm_target_layer") else (
        "layer" if section.get("layer_norm_target_layer") else None)


def _final_norm(section: dict[str, Any]) -> str | None:
    return "instance" if section.get("instance_norm_targets") else (
        "layer" if section.get("layer_norm_targets") else None)


def _current(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def apply_section(cfg: Any, section: SavedSection, tree: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Sets every reader's d2v key from the section; (what was taken, what was set there and not taken)."""
    taken, left = [], []
    values = section.values
    for key, target, convert in section.readers:
        raw = lookup(values, key)
        if raw is UNSET:
            continue
        value = _resolve(raw, tree)
        if value is None and convert not in (_optional_float, _optional_int):
            left.append(f"{section.where}.{key} (unresolved {raw!r})")
            continue
        set_value(cfg, target, convert(value))
        taken.append(f"{target}={convert(value)!r} ({section.where}.{key})")
    left += [f"{section.where}.{k}={values[k]!r}" for k in section.not_read
             if values.get(k) not in (None, False, 0, 0.0, "")]
    for key, target in section.compared:
        raw = lookup(values, key)
        if raw is not UNSET and raw is not None and raw != _current(cfg, target):
            left.append(f"{section.where}.{key}={raw!r} (d2v's {target} is {_current(cfg, target)!r})")
    return taken, left


def _norm_notes(cfg: Any, values: dict[str, Any]) -> list[str]:
    taken = []
    if any(k in values for k in ("instance_norm_target_layer", "layer_norm_target_layer")):
        cfg.teacher.layer_norm = _target_layer_norm(values)
        taken.append(f"teacher.layer_norm={cfg.teacher.layer_norm!r}")
    if any(k in values for k in ("instance_norm_targets", "layer_norm_targets")):
        cfg.teacher.final_norm = _final_norm(values)
        taken.append(f"teacher.final_norm={cfg.teacher.final_norm!r}")
    return taken


def apply_method(cfg: Any, sections: list[SavedSection], tree: dict[str, Any]) -> list[str]:
    """Applies every section; returns the notes: what was read, and what d2v did not take."""
    taken, left = [], []
    for section in sections:
        t, rest = apply_section(cfg, section, tree)
        taken += t + (_norm_notes(cfg, section.values) if section.target_norms else [])
        left += rest
    return _notes(cfg, taken, left)


def _notes(cfg: Any, taken: list[str], left: list[str]) -> list[str]:
    notes = [f"method read from the checkpoint: {', '.join(taken)}"] if taken else []
    if left:
        notes.append(f"set in the checkpoint but not taken (d2v keeps preset {cfg.name}'s): {', '.join(left)}")
    return notes


def _dict(tree: Any, path: str) -> dict[str, Any]:
    found = lookup(tree, path)
    return found if isinstance(found, dict) else {}


def audio_v1_method(cfg: Any, tree: dict[str, Any]) -> list[str]:
    """data2vec_audio: everything in the model section (wav2vec 2.0's config beneath it)."""
    model = _dict(tree, "model") or tree
    return apply_method(cfg, [SavedSection("model", model, TEACHER_AND_LOSS + AUDIO_V1, NOT_READ["audio"],
                                                target_norms=True)], tree)


def text_v1_method(cfg: Any, tree: dict[str, Any]) -> list[str]:
    """data2vec_text: teacher and loss in the model section, dropouts in its TransformerConfig,
    masking in the masked_lm task."""
    model = _dict(tree, "model") or tree
    return apply_method(cfg, [SavedSection("model", model, TEACHER_AND_LOSS, NOT_READ["text"], target_norms=True),
                              SavedSection("model.transformer", _dict(model, "transformer"), TEXT_V1_TRANSFORMER),
                              SavedSection("task", _dict(tree, "task"), TEXT_V1_TASK, NOT_READ["text_task"])], tree)


def v2_sections(cfg: Any, tree: dict[str, Any], encoder: str) -> list[SavedSection]:
    """data2vec_multi: the model section, and the modality's own (masks, decoder input)."""
    model = _dict(tree, "model") or tree
    modality = _dict(model, f"modalities.{encoder.lower()}")
    kind = mask_config(cfg.masking)
    blocks = "block_width" in kind.settings()
    left = () if blocks else ("mask_prob_adjust",)
    compared = [("post_mlp_drop", "model.dropout")]  # d2v's block has one dropout after attention and FFN
    mod_compared = [("prenet_dropout", "model.feature_dropout")]
    if not blocks and modality.get("mask_length", 1) != 1:  # only mask_length 1 is fairseq's random masking
        left += ("mask_length",)
    if "inverse_mask" in modality and bool(modality["inverse_mask"]) != (kind.kind == "inverse_block_2d"):
        left += ("inverse_mask",)
    return [SavedSection("model", model, TEACHER_AND_LOSS + MULTI, NOT_READ["multi"], tuple(compared),
                         target_norms=True),
            SavedSection(f"model.modalities.{encoder.lower()}", modality, V2_MODALITY + (V2_BLOCKS if blocks else []),
                    NOT_READ["multi_modality"] + left, tuple(mod_compared))]


# -- data2vec_vision (BEiT's run_cyclical.py): an argparse namespace, saved as `args` ---------------
BEIT: list[Reader] = [
    ("layer_scale_init_value", "model.image.layer_scale_init", float), ("drop_path", "model.image.drop_path", float),
    ("attn_drop_rate", "model.attention_dropout", float), ("ema_decay_init", "teacher.ema_start", float),
    ("ema_decay", "teacher.ema_end", float), ("ema_start_at", "teacher.ema_anneal_steps", int),
    ("num_mask_patches", "masking.num_mask_patches", int),
    ("min_mask_patches_per_block", "masking.min_block_patches", int),
    ("max_mask_patches_per_block", "masking.max_block_patches", _optional_int),
]
BEIT_NOT_READ = ("target_batch_norm", "var_w0", "mask_dropout_prob", "skip_ema_during_lr_decay_for_tri",
                 "ema_annealing_till_end")


def beit_method(cfg: Any, args: dict[str, Any]) -> list[str]:
    """data2vec_vision's settings: EMA, targets, loss, layer scale, drop path, block masks. `cfg`
    already has the image and patch size of the weights."""
    from d2v.config import get_preset

    preset = get_preset(cfg.name)
    preset_patches = (preset.model.image.image_size // preset.model.image.patch_size) ** 2
    num_patches = (cfg.model.image.image_size // cfg.model.image.patch_size) ** 2
    section = SavedSection("args", args, BEIT, BEIT_NOT_READ)
    taken, left = apply_section(cfg, section, args)
    if args.get("mask_dropout_prob") == -1.0:  # its "off" value
        left = [n for n in left if not n.startswith("args.mask_dropout_prob")]
    t = cfg.teacher
    layers = args.get("target_layers")
    if isinstance(layers, str):
        try:
            layers = ast.literal_eval(layers)  # a python list as text (--target_layers "[6,7,...]")
        except (ValueError, SyntaxError):
            layers = None
    depth = cfg.model.depth
    if isinstance(layers, (list, tuple)) and layers:
        if [int(i) % depth for i in layers] == list(range(depth - len(layers), depth)):
            t.top_k = len(layers)
            taken.append(f"teacher.top_k={t.top_k} (args.target_layers={list(layers)})")
        else:
            left.append(f"args.target_layers={list(layers)} (d2v averages the top K blocks)")
    if args.get("layer_results", "end") != "end":
        left.append(f"args.layer_results={args['layer_results']!r} (d2v's vision targets are block outputs)")
    if any(k in args for k in ("no_target_layer_norm_last", "target_instance_norm")):
        per_layer = [n for n, on in (("instance", args.get("target_instance_norm")),
                                     ("layer", not args.get("no_target_layer_norm_last"))) if on]
        if len(per_layer) > 1:
            left.append("args.target_instance_norm with the per-layer LayerNorm (d2v applies one)")
        t.layer_norm = per_layer[-1] if per_layer else None
        taken.append(f"teacher.layer_norm={t.layer_norm!r}")
    if any(k in args for k in ("post_target_instance_norm", "post_target_layer_norm")):
        t.final_norm = ("instance" if args.get("post_target_instance_norm") else
                        "layer" if args.get("post_target_layer_norm") else None)
        taken.append(f"teacher.final_norm={t.final_norm!r}")
    if "l2_loss" in args:
        lo = cfg.loss
        lo.kind, lo.beta = ("l2", 0.0) if args["l2_loss"] else ("smooth_l1", float(args.get("l1_beta", 0.12)))
        lo.scale = 1.0 if args.get("loss_scale", -1) in (-1, None) else float(args["loss_scale"])
        taken.append(f"loss.kind={lo.kind!r}, loss.beta={lo.beta}, loss.scale={lo.scale}")
    mk = cfg.masking
    if mk.num_mask_patches > num_patches:  # no count in the namespace: the preset's share of the patches
        count = round(num_patches * mk.num_mask_patches / preset_patches)
        taken.append(f"masking.num_mask_patches={count} (the preset's share of {num_patches} patches)")
        mk.num_mask_patches, mk.min_block_patches = count, min(mk.min_block_patches, max(1, count // 4))
    t.top_k = min(t.top_k, depth)
    return _notes(cfg, taken, left)
