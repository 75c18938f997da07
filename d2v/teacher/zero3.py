"""The ZeRO-3 teacher (docs/method.md §4): partitioned like the student, fp32 EMA per shard.

Each ZeRO-3 parameter is flattened, padded to a multiple of the world size and split in equal
slices; rank r holds slice r in `p.ds_tensor`, and DeepSpeed's fp32 master slice of that
parameter (`safe_get_local_fp32_param`) lines up with it element for element. The teacher is a
second, optimizer-less ZeRO-3 engine over a copy of the tracked modules, so its partitions line
up with the student's too. Every rank keeps the fp32 EMA of its own slices and updates them from
its local fp32 master slices with no communication, then writes them (in the compute dtype) into
the teacher's `ds_tensor`. Parameters under `stage3_param_persistence_threshold` stay gathered
after their first use: their full copies are refreshed with one all-gather after each update.
The forward pass gathers layer by layer through the engine's hooks (prefetching the next).
With `teacher.offload: cpu` the teacher engine offloads its parameters to host memory.

The update is a handful of multi-tensor kernels, not a few per parameter: the EMA slices are views
into one flat fp32 buffer (lerp over all of them at once, one cast to the teacher's dtype), and the
fp32 masters are read as views into DeepSpeed's flat groups (`local_fp32_masters`) rather than
through its per-parameter accessor, which waits on the reduce stream once per parameter.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from d2v import collectives


def partition_size(numel: int, world_size: int) -> int:
    return -(-numel // world_size)


def local_slice(full: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank `rank`'s zero-padded slice of a full parameter, as ZeRO-3 lays it out."""
    flat = full.reshape(-1)
    size = partition_size(flat.numel(), world_size)
    out = torch.zeros(size, dtype=flat.dtype)
    start = rank * size
    chunk = flat[start:start + size]
    out[: chunk.numel()] = chunk
    return out


def local_fp32_masters(params: list[Tensor]) -> list[Tensor | None]:
    """Each ZeRO-3 parameter's local fp32 master slice (None if it does not train), as a view into
    the optimizer's flat fp32 group where it lives. DeepSpeed's `safe_get_local_fp32_param`
    returns the same slice but synchronises the reduce stream for every parameter it is asked for
    (stage3.py `_get_fp32_opt_state_partition`); the EMA and the weight norms run after
    `engine.step()`, queued behind the optimizer's writes on the compute stream, so stream order
    already makes them read the stepped masters. Slices of groups swapped to NVMe are not resident:
    those go through the accessor, which swaps them in."""
    from deepspeed.utils import safe_get_local_fp32_param

    out: list[Tensor | None] = []
    for p in params:
        if not p.requires_grad:
            out.append(None)
            continue
        opt = p._z3_optimizer
        group, offset, numel = opt.grad_position[opt.get_param_id(p)]
        if opt._swappable_optimizer_subgroup(group):
            out.append(safe_get_local_fp32_param(p))
        else:
            out.append(opt.fp32_partitioned_groups_flat[group].narrow(0, offset, numel))
    return out


def flat_views(tensors: list[Tensor], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """One flat buffer holding copies of `tensors` end to end, and each one's 1-D view into it."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    views, offset = [], 0
    for t in tensors:
        view = flat[offset:offset + t.numel()]
        view.copy_(t.reshape(-1))
        views.append(view)
        offset += t.numel()
    return flat, views


def teacher_engine_config(student_config: dict[str, Any], offload: bool, pin_memory: bool) -> dict[str, Any]:
    """The student's ZeRO-3 settings without optimizer, scheduler or clipping; optional offload."""
    zero = copy.deepcopy(student_config.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    else:
        zero.pop("offload_param", None)
    keep = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16", "fp16",
            "steps_per_print", "wall_clock_breakdown")
    cfg = {k: copy.deepcopy(student_config[k]) for k in keep if k in student_config}
    cfg["zero_optimization"] = zero
    return cfg


class ShardedEMA:
    """Per-rank fp32 EMA slices of a ZeRO-3 teacher engine's parameters."""

    def __init__(self, model: nn.Module, ema_names: list[str], copy_names: list[str], student: nn.Module,
                 student_config: dict[str, Any], *, offload: bool) -> None:
        import deepspeed

        self.world_size = collectives.world_size()
        self.rank = collectives.rank()
        pin = offload and torch.cuda.is_available()
        self.engine, *_ = deepspeed.initialize(model=model, config=teacher_engine_config(student_config, offload, pin))
        self.module = self.engine.module
        self.ema_names, self.copy_names = ema_names, copy_names
        self.bind(student)
        # The teacher starts equal to the student: its EMA starts from the student's fp32 masters.
        device = self.ema_pairs[0][0].ds_tensor.device if self.ema_pairs else torch.device("cpu")
        self.flat, self.shards = flat_views([s.detach().float() for s in self._sources()], torch.float32, device)
        # The EMA in the teacher's dtype, cast in one kernel and copied into the partitions at once.
        low = {t.ds_tensor.dtype for t, _ in self.ema_pairs}
        if len(low) > 1:
            raise RuntimeError(f"the ZeRO-3 teacher's partitions mix dtypes {sorted(map(str, low))}")
        self.low_dtype = low.pop() if low else torch.float32
        if self.low_dtype == torch.float32:
            self.low_views = self.shards
        else:
            self.low_flat, self.low_views = flat_views(self.shards, self.low_dtype, device)

    def bind(self, student: nn.Module) -> None:
        params = dict(student.named_parameters())
        mine = dict(self.module.named_parameters())
        self.ema_pairs = [(mine[n], params[n]) for n in self.ema_names]
        self.copy_pairs = [(mine[n], params[n]) for n in self.copy_names]
        for t, s in self.ema_pairs + self.copy_pairs:
            if t.ds_tensor.numel() != s.ds_tensor.numel():
                raise RuntimeError("teacher and student ZeRO-3 partitions differ; both engines must use the "
                                   "same world size and partitioning")

    def _sources(self) -> list[Tensor]:
        """The student's local slices the EMA follows: fp32 masters (frozen parameters have none:
        their slice in the compute dtype), flat, in the EMA's order."""
        students = [s for _, s in self.ema_pairs]
        return [(m if m is not None else s.ds_tensor).reshape(-1)
                for m, s in zip(local_fp32_masters(students), students)]

    @torch.no_grad()
    def update(self, tau: float) -> None:
        if tau < 1.0 and self.shards:
            device = self.flat.device
            sources = [s.detach().to(device=device, dtype=torch.float32) for s in self._sources()]
            torch._foreach_lerp_(self.shards, sources, 1.0 - tau)
            if self.low_dtype != torch.float32:
                self.low_flat.copy_(self.flat)  # one cast, round to nearest even as before
            targets = [t.ds_tensor.view(-1) for t, _ in self.ema_pairs]
            torch._foreach_copy_(targets, [v.to(x.device) for v, x in zip(self.low_views, targets)])
        if self.copy_pairs:
            targets = [t.ds_tensor for t, _ in self.copy_pairs]
            torch._foreach_copy_(targets, [s.ds_tensor.to(t.device) for t, (_, s) in zip(targets, self.copy_pairs)])
        self._refresh_gathered()

    def _refresh_gathered(self) -> None:
        """Parameters that stay gathered (persistent, or still available) get their full copy rebuilt."""
        live = [t for t, _ in self.ema_pairs + self.copy_pairs if t.data.numel() == t.ds_numel]
        if not live:
            return
        local = torch.cat([t.ds_tensor.reshape(-1) for t in live])
        gathered = torch.empty(local.numel() * self.world_size, dtype=local.dtype, device=local.device)
        collectives.all_gather_into_(gathered, local)
        parts = gathered.view(self.world_size, -1)
        offset = 0
        for t in live:
            n = t.ds_tensor.numel()
            full = parts[:, offset:offset + n].reshape(-1)[: t.ds_numel]
            t.data.copy_(full.view(t.ds_shape).to(t.data.device))
            offset += n

    def gather_full(self) -> dict[str, Tensor]:
        """Full fp32 EMA weights (copied parameters in their own dtype, cast to fp32). Every rank
        must call this; every rank gets the result (small models) — callers save on rank 0."""
        out: dict[str, Tensor] = {}
        items = [(n, ema, t) for n, ema, (t, _) in zip(self.ema_names, self.shards, self.ema_pairs)]
        items += [(n, t.ds_tensor.float().view(-1), t) for n, (t, _) in zip(self.copy_names, self.copy_pairs)]
        for name, local, t in items:
            buf = torch.empty(local.numel() * self.world_size, dtype=torch.float32, device=local.device)
            collectives.all_gather_into_(buf, local.float().contiguous())
            out[name] = buf[: t.ds_numel].view(t.ds_shape).cpu().clone()
        return out

    @torch.no_grad()
    def load_full(self, state: dict[str, Tensor]) -> None:
        """Loads full fp32 weights written at any world size: each rank takes its own slices."""
        for i, (name, (t, _)) in enumerate(zip(self.ema_names, self.ema_pairs)):
            mine = local_slice(state[name].float(), self.rank, self.world_size)
            self.shards[i].copy_(mine.to(self.shards[i].device))
            t.ds_tensor.copy_(self.shards[i].view_as(t.ds_tensor))
        for name, (t, _) in zip(self.copy_names, self.copy_pairs):
            t.ds_tensor.copy_(local_slice(state[name], self.rank, self.world_size).view_as(t.ds_tensor))
        self._refresh_gathered()

    def device_bytes(self) -> int:
        """Bytes of teacher weights this rank holds on its device (partitions, plus gathered copies)."""
        total = 0
        for t, _ in self.ema_pairs + self.copy_pairs:
            if t.ds_tensor.device.type != "cpu" or not torch.cuda.is_available():
                total += t.ds_tensor.numel() * t.ds_tensor.element_size()
        return total
