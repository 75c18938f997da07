"""The EMA decay schedule (docs/method.md §3.1 step 5)."""
from __future__ import annotations


def ema_decay(step: int, start: float, end: float, anneal_steps: int) -> float:
    """tau rises linearly from `start` to `end` over `anneal_steps` updates, then stays at `end`
    (end = 1 freezes the teacher)."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return end - (end - start) * (1.0 - step / anneal_steps)
