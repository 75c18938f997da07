"""The guarded optimizer update every job makes (pretraining and fine-tuning alike).

After the micro-batches' backward passes, the host waits for the device once, for one decision
that every rank agrees on (docs/method.md §4, "One update loop"): is the loss and every gradient
finite, did any rank have real data (filler batches stand in for unreadable samples), was any
rank asked to stop. A
non-finite or data-less window is skipped on every rank: gradients dropped, weights untouched,
DeepSpeed's micro-step count kept aligned with the window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from d2v import collectives


@dataclass
class Decision:
    outcome: str  # "update" | "nonfinite" | "empty"
    stop: bool  # some rank was asked to stop (preemption)
    values: list[float]  # this rank's `local` values, read back with the decision


class GuardedUpdate:
    def __init__(self, engine, model: torch.nn.Module, grad_accum: int, device: torch.device) -> None:
        self.engine, self.grad_accum, self.device = engine, grad_accum, device
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient, or no data
        self.consecutive_skips = 0  # non-finite windows in a row
        self.consecutive_empty = 0  # windows in a row where no rank had a readable sample
        self._grad_sum = torch.zeros((), device=device)
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self._check_grad)

    def _check_grad(self, grad: torch.Tensor) -> torch.Tensor:
        # Runs in autograd before DeepSpeed's own gradient hooks. A NaN/inf anywhere makes the
        # running sum non-finite: one reduction per gradient, no host sync until the decision.
        self._grad_sum = self._grad_sum + grad.sum(dtype=torch.float32)
        return grad

    def begin(self) -> None:
        self._grad_sum = torch.zeros((), device=self.device)

    def decide(self, losses: torch.Tensor, local: torch.Tensor, *, stop_requested: bool,
               has_data: bool = True) -> Decision:
        """The one synchronisation of the step; `losses` is the window's summed loss (device)."""
        # A NaN/inf loss makes the gradients non-finite too; the sum over all of them decides.
        bad = (~torch.isfinite(self._grad_sum) | ~torch.isfinite(losses)).float().reshape(1)
        flags = torch.cat([bad, collectives.to_group_device([float(stop_requested), float(has_data)],
                                                            torch.float32, self.device)])
        (nonfinite, stop, any_data), values = collectives.agree_and_read(flags, local)
        if any_data == 0:
            self.consecutive_empty += 1
            return Decision("empty", stop > 0, values)
        self.consecutive_empty = 0
        if nonfinite > 0:
            self.consecutive_skips += 1  # the step count does not advance: the next batch retries it
            return Decision("nonfinite", stop > 0, values)
        self.consecutive_skips = 0
        return Decision("update", stop > 0, values)

    def skip(self, decision: Decision) -> dict[str, float]:
        """Drops the window's gradients (weights, optimizer state and teacher stay untouched);
        returns the step values the update loop reads for a skipped window."""
        self.engine.zero_grad()
        done = self.engine.micro_steps % self.grad_accum
        if done:
            self.engine.micro_steps += self.grad_accum - done
        self.skipped_steps += 1
        return {"skipped": 1.0, "skipped_steps": float(self.skipped_steps),
                "empty": float(decision.outcome == "empty"), "samples": 0.0}


class GuardedCounts:
    """The skip counters the update loop reads, for a stepper that holds its GuardedUpdate as `update`."""

    update: GuardedUpdate

    @property
    def skipped_steps(self) -> int:
        return self.update.skipped_steps

    @property
    def consecutive_skips(self) -> int:
        return self.update.consecutive_skips

    @property
    def consecutive_empty(self) -> int:
        return self.update.consecutive_empty
