"""Communication volume per optimizer step, counted analytically.

Bytes each rank sends (ring collectives: an all-reduce of S bytes sends 2(W-1)/W·S, a
reduce-scatter or all-gather (W-1)/W·S) for the student's gradients and parameters under a ZeRO
stage, plus the ZeRO-3 teacher's all-gather in its forward. Activations are never communicated
in data parallelism; the loss normaliser's all-reduce of one number is left out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class CommVolume:
    gradients: float
    """Bytes sent per rank to reduce gradients (all-reduce, or reduce-scatter from ZeRO-2 on)."""
    parameters: float
    """Bytes sent per rank to gather parameters (after the step for ZeRO-1/2; forward and backward for ZeRO-3)."""
    teacher: float
    """Bytes sent per rank to gather the ZeRO-3 teacher for its forward."""

    @property
    def total(self) -> float:
        return self.gradients + self.parameters + self.teacher

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


def comm_per_step(student_numel: int, teacher_numel: int, *, world_size: int, stage: int,
                  precision: str = "bf16", grad_accum: int = 1) -> CommVolume:
    c = 2 if precision in ("bf16", "fp16") else 4
    w = world_size
    if w == 1:
        return CommVolume(0.0, 0.0, 0.0)
    ring = (w - 1) / w
    grads = c * student_numel
    params = c * student_numel
    if stage <= 1:
        g = 2 * ring * grads * (grad_accum if stage == 0 else 1)  # stage 0 reduces every micro-batch
        p = ring * params if stage == 1 else 0.0
        return CommVolume(g, p, 0.0)
    if stage == 2:
        return CommVolume(ring * grads * grad_accum, ring * params, 0.0)
    # ZeRO-3: every micro-batch gathers the weights for forward and again for backward.
    return CommVolume(ring * grads * grad_accum, 2 * ring * params * grad_accum, ring * c * teacher_numel * grad_accum)
