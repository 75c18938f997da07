"""Start a run from pretrained weights on disk (`launchers/pretrain.py --init-from DIR`, and the
fine-tuning launcher through `init_from`).

DIR is either a transformers directory (what `export --format hf` writes for 1.0 and 2.0, or public
data2vec 1.0 weights: config.json + model.safetensors or pytorch_model.bin) or a d2v plain export
(student.safetensors, teacher.safetensors, config.json). Nothing is loaded unless everything
fits: the architecture the directory describes must be the run's (the fields that differ are
named with the override that fixes them), and every weight must have a home of the right shape
(missing, unexpected and mismatched keys are named). Task heads of transformers checkpoints
(pooler, lm_head, classifier) have no d2v counterpart: they are listed in the report, not loaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from d2v import safe_load
from d2v.interop.hf_layout import HF_IGNORABLE, HF_LAYOUTS, hf_layout, hf_to_d2v_name, is_v2, model_fields_from_hf
from d2v.interop.hf_v2 import (FIXED_BUFFERS, MODEL_TYPE, PREDICTION_MODULES, custom_model_fields, from_stock_depth,
                               stock_v2_fields)


@dataclass
class Pretrained:
    """Weights read from a directory, under d2v's student names."""

    kind: str
    """hf | plain"""
    student: dict[str, Tensor]
    """d2v student name -> tensor."""
    teacher: dict[str, Tensor] | None
    """The EMA teacher's state (plain exports), else None."""
    fields: dict[str, Any]
    """Structural `model.*` settings the directory fixes (dotted keys)."""
    source_names: dict[str, str] = field(default_factory=dict)
    """d2v name -> the name in the directory (for messages)."""
    ignored: list[str] = field(default_factory=list)
    """Directory keys with no d2v counterpart that are safe to skip (task heads, old buffers)."""
    unmapped: list[str] = field(default_factory=list)
    """Directory keys with no d2v counterpart that are not known to be safe: refused."""


@dataclass
class InitReport:
    path: str
    kind: str
    loaded: int
    """Tensors loaded into the model."""
    kept_init: list[str]
    """Model parameters the directory has none for and the caller allowed (e.g. a fresh head)."""
    ignored: list[str]
    teacher: dict[str, Tensor] | None
    """The teacher state to load after the teacher is built (None: the teacher copies the student)."""

    def summary(self) -> str:
        kept = sorted({n.split(".")[0] for n in self.kept_init})
        return (f"init from {self.path} ({self.kind}): {self.loaded} tensors; freshly initialised: "
                f"{', '.join(kept) or 'nothing'}; skipped from the directory: {len(self.ignored)} "
                f"({', '.join(self.ignored[:4])}{'...' if len(self.ignored) > 4 else ''}); teacher: "
                f"{'its own weights' if self.teacher is not None else 'a copy of the loaded student'}")


def structural_fields(model_cfg: Any) -> dict[str, Any]:
    """The `model.*` settings that decide the architecture (dropouts and init values do not)."""
    m = model_cfg
    out: dict[str, Any] = {"model.modality": m.modality, "model.embed_dim": m.embed_dim, "model.depth": m.depth,
                           "model.num_heads": m.num_heads, "model.ffn_dim": m.ffn_dim, "model.norm_eps": m.norm_eps,
                           "model.layer_norm_first": m.layer_norm_first}
    # A plain export's config is not validated: an unknown modality keeps the common fields, and
    # check_fits names the difference.
    layout = HF_LAYOUTS.get(m.modality)
    if layout is not None:
        out.update(layout.structural(m))
    return out


def _load_weights(directory: str) -> dict[str, Tensor]:
    path = os.path.join(directory, "model.safetensors")
    if os.path.isfile(path):
        return safe_load.load_safetensors(path)
    path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(path):
        state = safe_load.load(path)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{path} is not a state dict (name -> tensor)")
        return state
    if any(f.endswith(".index.json") for f in os.listdir(directory)):
        raise ValueError(f"{directory} holds a sharded checkpoint; d2v reads one model.safetensors or "
                         f"pytorch_model.bin (re-save it with max_shard_size large enough)")
    raise FileNotFoundError(f"{directory} has no model.safetensors or pytorch_model.bin")


def read_pretrained(directory: str) -> Pretrained:
    """Reads a transformers directory or a d2v plain export into d2v names."""
    from d2v.config import from_dict

    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory} has no config.json: --init-from takes a transformers directory or "
                                f"a `python -m d2v export` directory")
    with open(config_path) as f:
        config = json.load(f)
    if os.path.isfile(os.path.join(directory, "student.safetensors")):
        cfg = from_dict(config)
        teacher_path = os.path.join(directory, "teacher.safetensors")
        teacher = safe_load.load_safetensors(teacher_path) if os.path.isfile(teacher_path) else None
        fields = structural_fields(cfg.model)
        fields["model.v2.enabled"] = is_v2(cfg)
        return Pretrained("plain", safe_load.load_safetensors(os.path.join(directory, "student.safetensors")),
                          teacher, fields)
    if config.get("model_type") == MODEL_TYPE:
        return _read_data2vec2(directory, config)
    fields = hf_model_fields(directory, config)
    modality = fields["model.modality"]
    layout = hf_layout(modality)
    fields = layout.comparable(fields)
    own = _own_config(directory)
    if own is not None and is_v2(own):
        fields = _v2_fields(own)
    # 2.0 in a stock class (text): its prenet blocks come first in the block list
    prenet = fields.get("model.v2.prenet_depth", 0) if fields["model.v2.enabled"] else 0
    state = _load_weights(directory)
    prefix = layout.prefix
    student, names, ignored, unmapped = {}, {}, [], []
    for key, tensor in state.items():
        base = key[len(prefix):] if key.startswith(prefix) else key  # a task model's backbone
        name = hf_to_d2v_name(modality, base)
        name = None if name is None else from_stock_depth(name, prenet)
        if name is None:
            (ignored if HF_IGNORABLE.search(base) else unmapped).append(key)
            continue
        student[name] = tensor.reshape(-1) if name == "mask_embedding.weight" else tensor
        names[name] = key
    return Pretrained("hf", student, None, fields, names, sorted(ignored), sorted(unmapped))


def _own_config(directory: str) -> Any:
    """The d2v config a directory d2v wrote records (None for public weights)."""
    from d2v.config import find_directory_config

    return find_directory_config(directory)


def _v2_fields(cfg: Any) -> dict[str, Any]:
    fields = structural_fields(cfg.model)
    fields["model.v2.enabled"] = True
    fields["model.v2.prenet_depth"] = cfg.model.v2.prenet_depth
    return fields


def hf_model_fields(directory: str, config: dict[str, Any]) -> dict[str, Any]:
    """The `model.*` settings (dotted keys, v2.enabled included) a transformers config.json fixes:
    d2v's data2vec2 modelling file, or a stock class (2.0 when config.json marks it, else 1.0)."""
    path = os.path.join(directory, "config.json")
    if config.get("model_type") == MODEL_TYPE:
        return custom_model_fields(config, path)
    if "model_type" not in config:
        raise ValueError(f"{path} is a d2v run config, not a transformers config.json: export the run first "
                         f"(`python -m d2v export RUN OUT`, plain or --format hf) and pass OUT")
    return {**model_fields_from_hf(config), **stock_v2_fields(config)}


def _read_data2vec2(directory: str, config: dict[str, Any]) -> Pretrained:
    """A 2.0 audio or image export (d2v's modelling file): d2v's own names, minus the fixed buffers
    d2v recomputes. Its config.json holds every structural field, so a copy transformers re-saved
    (no d2v_export.json) reads the same."""
    own = _own_config(directory)
    fields = _v2_fields(own) if own is not None else hf_model_fields(directory, config)
    student, ignored = {}, []
    for key, tensor in _load_weights(directory).items():
        if key in FIXED_BUFFERS:
            ignored.append(key)
        else:
            student[key] = tensor
    return Pretrained("hf", student, None, fields, ignored=sorted(ignored))


def pretrained_config(directory: str) -> Any:
    """The d2v config a pretrained directory describes: the run's own config for d2v exports (plain,
    or transformers format written by d2v), else the nearest preset of the modality and method
    with the architecture of the transformers config.json (public weights, or a d2v export that
    transformers re-saved). Validated."""
    from d2v.config import find_directory_config, get_preset, set_value

    own = find_directory_config(directory)
    if own is not None:
        return own.validate()
    with open(os.path.join(directory, "config.json")) as f:
        fields = hf_model_fields(directory, json.load(f))
    size = {768: "base", 1024: "large"}.get(fields["model.embed_dim"], "tiny")
    cfg = get_preset(f"{fields['model.modality']}_{size}{'_v2' if fields['model.v2.enabled'] else ''}")
    for key, value in fields.items():
        set_value(cfg, key, value)
    cfg.teacher.top_k = min(cfg.teacher.top_k, cfg.model.depth)
    return cfg.validate()


def check_fits(cfg: Any, pre: Pretrained, directory: str) -> None:
    """Raises ValueError naming every architecture setting where the directory and the run differ."""
    mine = structural_fields(cfg.model)
    mine["model.v2.enabled"] = is_v2(cfg)
    if is_v2(cfg):
        mine["model.v2.prenet_depth"] = cfg.model.v2.prenet_depth
    diffs = [(k, pre.fields[k], mine[k]) for k in mine if k in pre.fields and pre.fields[k] != mine[k]]
    if diffs:
        lines = "; ".join(f"{k}: directory {a!r}, run {b!r}" for k, a, b in diffs)
        # Modality and method are the preset's choice, not overrides: v2.enabled alone would keep
        # the other method's settings.
        fix = " ".join(f"{k}={_override(a)}" for k, a, _ in diffs if k not in _PRESET_FIELDS)
        method = pre.fields.get("model.v2.enabled")
        advice = "Use a preset of the directory's modality" + (
            f" and method (data2vec {'2.0' if method else '1.0'}: a {'_v2' if method else 'non-_v2'} preset)"
            if any(k == "model.v2.enabled" for k, _, _ in diffs) else "")
        raise ValueError(f"{directory} does not fit this run's architecture: {lines}. {advice}"
                         f"{', and override: ' + fix if fix else ''}")


_PRESET_FIELDS = ("model.modality", "model.v2.enabled")


def _override(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return json.dumps(value).replace(" ", "")
    return str(value)


def init_from(model: nn.Module, directory: str, cfg: Any | None = None, *,
              allow_missing: tuple[str, ...] = PREDICTION_MODULES) -> InitReport:
    """Loads pretrained weights into a d2v model (the student, or any module with its names).

    cfg: the run's config; when given, the directory's architecture is checked against it.
    allow_missing: module prefixes that may keep their fresh initialisation when the directory
    has no weights for them (transformers checkpoints never hold d2v's regression head or 2.0 decoder).
    Raises before touching the model if anything does not fit.
    """
    pre = read_pretrained(directory)
    broken = [f"{what}{pre.source_names.get(n, n)}" for what, state in (("", pre.student), ("teacher ", pre.teacher or {}))
              for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise ValueError(f"{directory} holds weights with NaN or infinite values: {broken[:8]}"
                         f"{' ...' if len(broken) > 8 else ''}; a run started from them would train on NaN")
    if cfg is not None:
        check_fits(cfg, pre, directory)
    expected = model.state_dict()
    allowed = tuple(p.rstrip(".") for p in allow_missing)

    def _allowed(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in allowed)

    def label(name: str) -> str:  # the directory's own name for a weight, in messages
        return pre.source_names.get(name, name)

    missing = [n for n in expected if n not in pre.student and not _allowed(n)]
    unexpected = [label(n) for n in pre.student if n not in expected] + pre.unmapped
    mismatched = [f"{label(n)}: directory {tuple(pre.student[n].shape)}, model {tuple(expected[n].shape)}"
                  for n in pre.student if n in expected and pre.student[n].shape != expected[n].shape]
    if missing or unexpected or mismatched:
        raise KeyError(f"{directory} does not fit the model: missing {missing}, unexpected {unexpected}, "
                       f"mismatched {mismatched}")
    with torch.no_grad():
        for name, tensor in expected.items():
            if name in pre.student:
                tensor.copy_(pre.student[name].to(tensor.dtype))
    kept = [n for n in expected if n not in pre.student]
    return InitReport(directory, pre.kind, len(pre.student), kept, pre.ignored, pre.teacher)
