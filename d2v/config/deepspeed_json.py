"""Fills a DeepSpeed JSON template from the d2v config.

The JSON holds engine settings (ZeRO stage, buckets, offload). Batch sizes, precision, gradient
clipping and the optimizer come from the d2v config; a template that sets one of them to a
different value is an error rather than a silent winner, so nothing is set in two places.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

from d2v.config.schema import D2vConfig

OWNED_BY_D2V = ("optimizer", "scheduler")
OPTIMIZERS = {"torch_fused": "torch.optim.AdamW(fused=True)", "deepspeed": "DeepSpeed FusedAdam (JIT-built)"}


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed JSON (template or filled) asks for; 0 without ZeRO."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def optimizer_description(ds: dict[str, Any]) -> str:
    """Which AdamW kernel a filled config runs, for the run log."""
    params = ds.get("optimizer", {}).get("params", {})
    return OPTIMIZERS["torch_fused"] if params.get("torch_adam") else OPTIMIZERS["deepspeed"]


class DeepSpeedConfigError(ValueError):
    pass


def _agree(template: dict[str, Any], key: str, value: Any, source: str) -> None:
    if key in template and template[key] != value:
        raise DeepSpeedConfigError(
            f"DeepSpeed JSON sets {key}={template[key]!r} but the d2v config gives {value!r} "
            f"(from {source}); remove {key!r} from the JSON or change {source}")


# The templates d2v ships (the checkout's ds_configs/ is a link to this folder).
SHIPPED_TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def shipped_template_names() -> list[str]:
    return sorted(f for f in os.listdir(SHIPPED_TEMPLATES) if f.endswith(".json"))


def template_path(path: str) -> str:
    """The file at `path`; where none exists, the shipped template of that file name, so that the
    documented `--ds_config ds_configs/zero2.json` (or just `zero2.json`) works from any directory
    and from an installed d2v."""
    if os.path.exists(path):
        return path
    name = os.path.basename(path)
    if name in shipped_template_names():
        return os.path.join(SHIPPED_TEMPLATES, name)
    raise DeepSpeedConfigError(f"DeepSpeed template {path}: no such file, and d2v ships no template of that name; "
                               f"pass a JSON file or one of {', '.join(shipped_template_names())}")


def load_template(path: str) -> dict[str, Any]:
    path = template_path(path)
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DeepSpeedConfigError(f"{path} is not valid JSON: {e}") from None


def fill_ds_config(template: dict[str, Any], cfg: D2vConfig, world_size: int, *, on_cpu: bool) -> dict[str, Any]:
    """Returns a complete DeepSpeed config for `world_size` data-parallel ranks."""
    ds = copy.deepcopy(template)
    tr, opt = cfg.train, cfg.optim
    for key in OWNED_BY_D2V:
        if key in ds:
            raise DeepSpeedConfigError(
                f"DeepSpeed JSON has an {key!r} section; d2v builds it from the config's optim.* fields "
                f"(optim.lr, optim.betas, optim.schedule, ...): remove it from the JSON")
    global_batch = tr.micro_batch_size * tr.grad_accum * world_size
    if tr.global_batch_size is not None and tr.global_batch_size != global_batch:
        raise DeepSpeedConfigError(
            f"train.global_batch_size={tr.global_batch_size} but micro_batch_size ({tr.micro_batch_size}) x "
            f"grad_accum ({tr.grad_accum}) x world size ({world_size}) = {global_batch}; change one of them")
    _agree(ds, "train_micro_batch_size_per_gpu", tr.micro_batch_size, "train.micro_batch_size")
    _agree(ds, "gradient_accumulation_steps", tr.grad_accum, "train.grad_accum")
    _agree(ds, "train_batch_size", global_batch, "train.micro_batch_size x train.grad_accum x world size")
    # DeepSpeed's throughput timer synchronises the whole device twice per micro-batch when no
    # data loader is handed to it (d2v's case); the run log measures throughput itself.
    ds.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})
    ds["train_micro_batch_size_per_gpu"] = tr.micro_batch_size
    ds["gradient_accumulation_steps"] = tr.grad_accum
    ds["train_batch_size"] = global_batch

    for mode in ("bf16", "fp16"):
        want = tr.precision == mode
        section = dict(ds.get(mode, {}))
        if "enabled" in section and bool(section["enabled"]) != want:
            raise DeepSpeedConfigError(
                f"DeepSpeed JSON sets {mode}.enabled={section['enabled']} but train.precision={tr.precision!r}; "
                f"remove {mode}.enabled from the JSON or change train.precision")
        section["enabled"] = want
        if mode == "bf16" and want:
            # d2v decides finiteness itself before every update (and skips on all ranks); with no
            # loss scale to adjust, DeepSpeed's own overflow check only adds a device read.
            section.setdefault("check_grad_overflow", False)
        if mode == "fp16" and want:
            section.setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
            section.setdefault("initial_scale_power", 16)
            section.setdefault("loss_scale_window", 1000)
            section.setdefault("hysteresis", 2)
            section.setdefault("min_loss_scale", 1)  # DeepSpeed takes an integer here
        ds[mode] = section

    _agree(ds, "gradient_clipping", float(opt.clip_norm), "optim.clip_norm")
    ds["gradient_clipping"] = float(opt.clip_norm)
    params: dict[str, Any] = {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
    if opt.implementation not in OPTIMIZERS:
        raise DeepSpeedConfigError(f"optim.implementation={opt.implementation!r}: use one of {sorted(OPTIMIZERS)}")
    if on_cpu or opt.implementation == "torch_fused":
        # DeepSpeed's FusedAdam and CPU-Adam are compiled at start-up (d2v installs DeepSpeed with
        # DS_BUILD_OPS=0); torch's fused AdamW needs no build, on CPU and GPU alike, and also
        # serves ZeRO's offloaded optimizer (which would otherwise insist on CPU-Adam).
        params["torch_adam"] = True
        params["fused"] = True
        ds["zero_force_ds_cpu_optimizer"] = False
    if on_cpu:
        # host memory cannot be pinned without CUDA
        for key in ("offload_optimizer", "offload_param"):
            section = ds.get("zero_optimization", {}).get(key)
            if isinstance(section, dict) and section.get("pin_memory"):
                section["pin_memory"] = False
    ds["optimizer"] = {"type": "AdamW", "params": params}
    ds.setdefault("steps_per_print", 10**9)  # d2v logs; keep DeepSpeed's own prints quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds
