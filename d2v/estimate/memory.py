"""Per-rank memory of a run, counted analytically (docs/method.md §4).

Bytes per rank for the student's parameters, gradients and optimizer state (fp32 master copy
plus Adam's two moments) and for the teacher, on the device and in host memory, for a ZeRO
stage, world size and precision. Partitioned tensors follow ZeRO-3's layout: each parameter
padded to a multiple of the world size and split evenly; parameters below the persistence
threshold stay gathered too. Tests compare these numbers with tensor sizes measured on 2 ranks.
Activations and communication buffers are not counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class RankMemory:
    student_params: int
    """Device bytes of the student's module weights (compute dtype; partitions under ZeRO-3)."""
    gradients: int
    """Device bytes of gradients after backward (compute dtype; partitioned from ZeRO-2 on)."""
    optimizer_state: int
    """Bytes of the fp32 master weights and Adam moments (host bytes when the optimizer is offloaded)."""
    optimizer_on_host: bool
    """Whether the optimizer state lives in host memory (offload_optimizer)."""
    teacher_device: int
    """Device bytes of the teacher's resident weights and EMA (a streamed teacher: its two largest consecutive units)."""
    teacher_host: int
    """Host bytes of the teacher's weights and EMA (offloaded teachers)."""

    def as_dict(self) -> dict:
        return asdict(self)


def _shard(numel: int, world_size: int) -> int:
    return -(-numel // world_size)


def student_bytes(numels: Iterable[int], *, world_size: int, stage: int, precision: str,
                  persistence_threshold: int = 100_000) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) bytes per rank."""
    numels = list(numels)
    c = COMPUTE_BYTES[precision]
    total = sum(numels)
    if stage == 3:
        local = sum(_shard(n, world_size) for n in numels)
        persistent = sum(n for n in numels if n < persistence_threshold)
        params = c * (local + persistent)
    else:
        local = _shard(total, world_size) if stage in (1, 2) else total
        params = c * total
    grads = c * (total if stage < 2 else local)
    # fp32 mode at stage 0: the optimizer updates the module's own fp32 weights (no master copy).
    master = 0 if (stage == 0 and precision == "fp32") else 4 * local
    return params, grads, master + 8 * local


def teacher_bytes(numels: list[int], unit_numels: list[int], *, world_size: int, stage: int, precision: str,
                  offload: bool, persistence_threshold: int = 100_000, copied_numels: list[int] = ()) -> tuple[int, int]:
    """(device, host) bytes per rank. numels: per teacher parameter (copied ones included);
    copied_numels: those copied from the student (no EMA of their own); unit_numels: per streamed unit."""
    c = COMPUTE_BYTES[precision]
    if stage == 3:
        local = sum(_shard(n, world_size) for n in numels)
        copied = sum(_shard(n, world_size) for n in copied_numels)
        # A gathered persistent parameter is a copy beside its partition, except on one rank,
        # where DeepSpeed's gather returns the partition itself (measured: same storage).
        persistent = sum(n for n in numels if n < persistence_threshold) if world_size > 1 else 0
        stored = c * local + 4 * (local - copied)  # the partition in the compute dtype + fp32 EMA of averaged ones
        if offload:
            return c * persistent, stored
        return stored + c * persistent, 0
    total = sum(numels)
    if offload:
        # Two device slots of the largest unit (offload.py). Norm and bias-table parameters stream
        # in fp32, a few per cent of a unit, not counted here.
        return 2 * c * max(unit_numels), 4 * total
    return 4 * total, 0


def per_rank_memory(cfg, *, world_size: int, stage: int, teacher_offload: bool = False,
                    offload_optimizer: bool = False, persistence_threshold: int = 100_000) -> RankMemory:
    """Builds the model on the meta device, so describing a large preset costs no memory."""
    import torch

    from d2v.models import build_model
    from d2v.teacher import Teacher
    from d2v.teacher.offload import streaming_units

    with torch.device("meta"):
        student = build_model(cfg)
        teacher = Teacher(student, cfg.teacher)
    s_numels = [p.numel() for p in student.parameters() if p.requires_grad]
    params, grads, optim = student_bytes(s_numels, world_size=world_size, stage=stage,
                                         precision=cfg.train.precision, persistence_threshold=persistence_threshold)
    t_numels = [p.numel() for p in teacher.model.parameters()]
    copied = [p.numel() for n, p in teacher.model.named_parameters() if n in teacher.copy_names]
    units = [sum(p.numel() for p in u.parameters()) for u in streaming_units(teacher.model)]
    t_dev, t_host = teacher_bytes(t_numels, units, world_size=world_size, stage=stage, precision=cfg.train.precision,
                                  offload=teacher_offload, persistence_threshold=persistence_threshold,
                                  copied_numels=copied)
    return RankMemory(params, grads, optim, offload_optimizer, t_dev, t_host)
