"""Checks of the filled DeepSpeed config before any engine is built:
unknown ZeRO keys, and pinned offload on a CUDA machine whose `ulimit -l` cannot pin it."""
from __future__ import annotations

import difflib
import resource
from typing import Any

import torch


def zero_keys() -> set[str]:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    names = set()
    for name, info in DeepSpeedZeroConfig.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return names


def check_zero_section(ds: dict[str, Any]) -> None:
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError("zero_optimization in the DeepSpeed JSON must be an object")
    known = zero_keys()
    unknown = sorted(k for k in zero if k not in known)
    if unknown:
        hints = [f"{k!r} (did you mean {difflib.get_close_matches(k, known, n=1)[0]!r}?)"
                 if difflib.get_close_matches(k, known, n=1) else repr(k) for k in unknown]
        raise ValueError(f"unknown zero_optimization keys in the DeepSpeed JSON: {', '.join(hints)}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage!r}: use 0, 1, 2 or 3")
    if "offload_param" in zero and zero["offload_param"] and stage != 3:
        raise ValueError("offload_param needs zero_optimization.stage=3 (use offload_optimizer for stages 1-2)")


def check_pinned_memory(ds: dict[str, Any], *, cuda: bool | None = None, bytes_needed: int = 0) -> None:
    """Pinned host buffers count against RLIMIT_MEMLOCK; a low limit fails deep inside DeepSpeed."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    zero = ds.get("zero_optimization", {})
    pinned = [k for k in ("offload_optimizer", "offload_param")
              if isinstance(zero.get(k), dict) and zero[k].get("pin_memory")]
    if not cuda or not pinned:
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < max(bytes_needed, 1 << 30):
        raise ValueError(
            f"{', '.join(pinned)} asks for pinned host memory but `ulimit -l` allows only {soft // 1024} KiB; "
            f"raise it (`ulimit -l unlimited`, or the memlock limit of the container/Slurm job) or set "
            f"pin_memory: false in the DeepSpeed JSON")


def check_ds_config(ds: dict[str, Any]) -> None:
    check_zero_section(ds)
    check_pinned_memory(ds)
