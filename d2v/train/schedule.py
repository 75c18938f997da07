"""Learning-rate schedules as multipliers of the peak LR (for torch's LambdaLR)."""
from __future__ import annotations

import math
from typing import Callable

from d2v.config.schema import OptimConfig


def tri_stage(max_steps: int, phase_ratios: tuple[float, float, float], init_scale: float,
              final_scale: float) -> Callable[[int], float]:
    """fairseq's tri-stage: linear warmup from init_scale, hold at the peak, exponential decay to final_scale."""
    warmup = int(round(phase_ratios[0] * max_steps))
    hold = int(round(phase_ratios[1] * max_steps))
    decay = max(max_steps - warmup - hold, 1)
    decay_rate = -math.log(final_scale) / decay

    def factor(step: int) -> float:
        if step < warmup:
            return init_scale + (1.0 - init_scale) * step / warmup
        if step < warmup + hold:
            return 1.0
        return math.exp(-decay_rate * min(step - warmup - hold, decay))

    return factor


def cosine(max_steps: int, warmup: int, min_scale: float) -> Callable[[int], float]:
    """Linear warmup from 0, then a half cosine down to min_scale at max_steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(warmup, 1)
        progress = min((step - warmup) / max(max_steps - warmup, 1), 1.0)
        return min_scale + (1.0 - min_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def polynomial(max_steps: int, warmup: int, end_scale: float, power: float = 1.0) -> Callable[[int], float]:
    """fairseq's polynomial_decay: linear warmup from 0 (the first update runs at 0, as fairseq's
    trainer sets the LR of update 0 before it), then (1 - progress)^power down to end_scale at max_steps."""
    def factor(step: int) -> float:
        if warmup > 0 and step <= warmup:
            return step / warmup
        if step >= max_steps:
            return end_scale
        remaining = 1.0 - (step - warmup) / (max_steps - warmup)
        return (1.0 - end_scale) * remaining ** power + end_scale

    return factor


def constant(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, step / warmup) if warmup > 0 else 1.0


# optim.schedule -> the schedule of a run (the names are CHOICES["optim.schedule"])
SCHEDULES: dict[str, Callable[[OptimConfig, int], Callable[[int], float]]] = {
    "tri_stage": lambda opt, n: tri_stage(n, opt.phase_ratios, opt.init_lr_scale, opt.final_lr_scale),
    "cosine": lambda opt, n: cosine(n, opt.warmup_steps, opt.min_lr / opt.lr),
    "constant": lambda opt, n: constant(opt.warmup_steps),
    "polynomial": lambda opt, n: polynomial(n, opt.warmup_steps, opt.min_lr / opt.lr),
}


def lr_factor(opt: OptimConfig, max_steps: int) -> Callable[[int], float]:
    return SCHEDULES[opt.schedule](opt, max_steps)
