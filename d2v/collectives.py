"""Every collective d2v issues, in one place.

NCCL only moves CUDA tensors (a CPU tensor in an NCCL all-reduce fails with "No backend type
associated with device type cpu"), gloo only host tensors. So no caller builds the tensors a
collective receives: these functions take and return Python values, or device tensors that they
check, and create their own tensors on the process group's device. Values travel from pinned
host memory with non-blocking copies, and results come back in one device-to-host read, so a
collective costs at most the one synchronisation its Python result needs.

With a single process every function is a no-op on its input (no process group is needed).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

_OPS = ("sum", "max", "min")


def _dist():
    import deepspeed.comm as dist

    return dist


def is_initialized() -> bool:
    import torch.distributed as td

    return td.is_available() and td.is_initialized()


def world_size() -> int:
    return _dist().get_world_size() if is_initialized() else 1


def rank() -> int:
    return _dist().get_rank() if is_initialized() else 0


def backend() -> str:
    """The default group's backend as torch names it ("nccl", "gloo", "cuda:gloo", ...)."""
    import torch.distributed as td

    return str(td.get_backend()) if is_initialized() else "none"


def device_for_backend(name: str) -> torch.device:
    """Where a collective's tensors must live. A plain backend name: NCCL serves CUDA tensors,
    gloo/MPI the CPU. A device map ("cuda:gloo", "cpu:gloo,cuda:nccl"): host tensors where the
    map serves the CPU, else the current CUDA device."""
    name = name.lower()
    if ":" not in name:
        return torch.device("cuda", torch.cuda.current_device()) if name == "nccl" else torch.device("cpu")
    served = {part.split(":", 1)[0].strip() for part in name.split(",")}
    if "cpu" in served:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def group_device() -> torch.device:
    return device_for_backend(backend())


def _reduce_op(op: str):
    if op not in _OPS:
        raise ValueError(f"unknown reduction {op!r}; one of {_OPS}")
    dist = _dist()
    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]


def to_group_device(values: Sequence[float], dtype: torch.dtype = torch.float64,
                    device: torch.device | None = None) -> torch.Tensor:
    """A tensor of `values` on the group's device, copied from pinned memory without blocking."""
    device = device or group_device()
    host = torch.tensor(list(values), dtype=dtype)
    if device.type == "cpu":
        return host
    return _pinned(host).to(device, non_blocking=True)


def _pinned(host: torch.Tensor) -> torch.Tensor:
    # a blocking copy from pageable memory would wait for the device's queue to drain
    return host.pin_memory() if torch.cuda.is_available() else host


def _on_group_device(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when it lives where the group's backend works, else a copy there."""
    want = group_device()
    if t.device.type == want.type:
        return t
    if t.device.type == "cpu":
        return _pinned(t).to(want, non_blocking=True)
    return t.to(want)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce. A tensor that lives elsewhere than the group's device (host-resident
    weights under NCCL) travels through a copy there and back."""
    if world_size() == 1:
        return t
    work = _on_group_device(t)
    _dist().all_reduce(work, op=_reduce_op(op))
    if work is not t:
        t.copy_(work)
    return t


def all_reduce_values(values: Sequence[float], op: str = "sum", dtype: torch.dtype = torch.float64) -> list[float]:
    """Python numbers reduced over ranks (one collective, one device-to-host read)."""
    values = [float(v) for v in values]
    if world_size() == 1 or not values:
        return values
    t = to_group_device(values, dtype)
    _dist().all_reduce(t, op=_reduce_op(op))
    return t.tolist()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    summed = all_reduce_values([values[k] for k in keys])
    return {k: v / world_size() for k, v in zip(keys, summed)}


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank."""
    if world_size() == 1:
        return bool(flag)
    return all_reduce_values([1.0 if flag else 0.0], op="max")[0] > 0


def all_gather_into_(out: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's `local` into `out`, through the group's device if either
    lives elsewhere."""
    if world_size() == 1:
        out.copy_(local.reshape(out.shape))
        return out
    work_out, work_local = _on_group_device(out), _on_group_device(local.contiguous())
    _dist().all_gather_into_tensor(work_out, work_local)
    if work_out is not out:
        out.copy_(work_out)
    return out


def barrier() -> None:
    if world_size() > 1:
        _dist().barrier()


def agree_and_read(flags: torch.Tensor, local: torch.Tensor) -> tuple[list[float], list[float]]:
    """`flags` (1-D, on the group's device) max-reduced over ranks, read back together with this
    rank's `local` values in one device-to-host copy: the one synchronisation a training step
    needs (skip or not, stop or not, and the step's metrics)."""
    if world_size() > 1:
        flags = all_reduce_(flags, "max")
    both = torch.cat([flags.to(local.dtype), local.reshape(-1)]).tolist()
    return both[: flags.numel()], both[flags.numel():]


def count_normalizer() -> "Callable[[int], float | torch.Tensor]":
    """count -> (count summed over ranks) / world size, as a device tensor that is never read
    back (the loss divides by it on the device); DeepSpeed's gradient mean then gives sum/N."""
    size = world_size()

    def normalize(count: int) -> float | torch.Tensor:
        if size == 1:
            return float(max(count, 1))
        t = to_group_device([float(count)])
        _dist().all_reduce(t)
        # float32 like the loss: the same value a host division would give, cast once
        return (t[0].clamp_min(1.0) / size).float()

    return normalize
