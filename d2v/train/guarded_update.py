"""The guarded optimizer update every job makes (pretraining and fine-tuning alike).

After the micro-batches' backward passes, the host waits for the device once, for one decision
that every rank agrees on (docs/method.md §4, "One update loop"): is the loss and every gradient
finite, did any rank have real data (filler batches stand in for unreadable samples), was any
rank asked to stop, and did the previous update leave finite weights. A
non-finite or data-less window is skipped on every rank: gradients dropped, weights untouched,
DeepSpeed's micro-step count kept aligned with the window. Weights that an update with finite
gradients made non-finite (a far too large LR) cannot be skipped back: the run stops on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch

from d2v import collectives


class NonFiniteError(RuntimeError):
    """Too many updates in a row were skipped for NaN/inf, or the state itself is not finite."""


def _local_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's share of the module's weights (ZeRO-3 keeps only a partition, `ds_tensor`)."""
    out = []
    for p in module.parameters():
        t = getattr(p, "ds_tensor", p).detach()
        if t.numel():
            out.append(t)
    return out


def nonfinite_count(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """How many of `tensors` hold a NaN/inf, as a device scalar (one fused norm per dtype)."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(tensors)  # an offloaded teacher's norms are host scalars
    return (~torch.isfinite(torch.stack([n.float().to(device) for n in norms]))).sum().float()


def state_is_finite(engine, extra: list[torch.Tensor], device: torch.device) -> bool:
    """Whether the student's weights, the optimizer's master weights and moments and `extra`
    (the teacher) are finite on every rank. A collective with a host read: called at saves only."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    tensors = _local_tensors(engine.module) + [t for t in extra if t.numel()]
    if opt is not None:
        tensors += [p.detach() for g in opt.param_groups for p in g["params"] if p.numel()]
        tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    bad = collectives.all_reduce_values([float(nonfinite_count(tensors, device))])[0]
    return bad == 0


@dataclass
class Decision:
    outcome: str  # "update" | "nonfinite" | "empty"
    stop: bool  # some rank was asked to stop (preemption)
    values: list[float]  # this rank's `local` values, read back with the decision


@dataclass
class Window:
    """What one accumulation window decided, with its values read back in the same sync."""

    decision: Decision
    loss: float
    """The mean loss over the window's micro-batches (meaningful when the outcome is "update")."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Each micro-batch metric, averaged over the window."""


Item = TypeVar("Item")
MicroStep = Callable[[int, Item], "tuple[torch.Tensor, dict[str, float | torch.Tensor]]"]


class GuardedUpdate:
    def __init__(self, engine, model: torch.nn.Module, grad_accum: int, device: torch.device) -> None:
        self.engine, self.grad_accum, self.device = engine, grad_accum, device
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient, or no data
        self.consecutive_skips = 0  # non-finite windows in a row
        self.consecutive_empty = 0  # windows in a row where no rank had a readable sample
        self._grad_sums: list[torch.Tensor] = []
        self._model = model
        self._weights_bad = torch.zeros((), device=device)
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self._check_grad)

    def _check_grad(self, grad: torch.Tensor) -> torch.Tensor:
        # Runs in autograd before DeepSpeed's own gradient hooks. A NaN/inf anywhere makes its
        # sum non-finite: one kernel per gradient (the sums are added once, at the decision), no
        # host sync until the decision.
        self._grad_sums.append(grad.sum(dtype=torch.float32))
        return grad

    def begin(self) -> None:
        self._grad_sums = []
        # What the previous update left: read with this window's decision, no wait of its own.
        self._weights_bad = nonfinite_count(_local_tensors(self._model), self.device)

    def decide(self, losses: torch.Tensor, local: torch.Tensor, *, stop_requested: bool,
               has_data: bool = True) -> Decision:
        """The one synchronisation of the step; `losses` is the window's summed loss (device)."""
        # A NaN/inf loss makes the gradients non-finite too; the sum over all of them decides.
        grad_sum = torch.stack(self._grad_sums).sum() if self._grad_sums else torch.zeros((), device=self.device)
        bad = (~torch.isfinite(grad_sum) | ~torch.isfinite(losses)).float().reshape(1)
        flags = torch.cat([bad, (self._weights_bad > 0).float().reshape(1),
                           collectives.to_group_device([float(stop_requested), float(has_data)],
                                                       torch.float32, self.device)])
        (nonfinite, broken, stop, any_data), values = collectives.agree_and_read(flags, local)
        if broken > 0:
            raise NonFiniteError("the weights are NaN/inf after the last update, whose loss and gradients were "
                                 "finite: the step itself broke them (optim.lr far too large, or an overflow in "
                                 "the optimizer); skipping cannot undo that")
        if any_data == 0:
            self.consecutive_empty += 1
            return Decision("empty", stop > 0, values)
        self.consecutive_empty = 0
        if nonfinite > 0:
            self.consecutive_skips += 1  # the step count does not advance: the next batch retries it
            return Decision("nonfinite", stop > 0, values)
        self.consecutive_skips = 0
        return Decision("update", stop > 0, values)

    def window(self, micro: Sequence[Item], micro_step: MicroStep, *, stop_requested: bool,
               has_data: bool = True) -> Window:
        """Backward over every micro-batch of one update, then the decision; the optimizer step
        is the caller's (only when the outcome is "update"). `micro_step(i, item)` returns the
        micro-batch's loss and its metrics: device scalars are summed on the device and read back
        with the decision, host numbers are summed on the host."""
        self.begin()
        losses = torch.zeros((), device=self.device)
        device_sums: dict[str, torch.Tensor] = {}
        host_sums: dict[str, float] = {}
        for i, item in enumerate(micro):
            loss, metrics = micro_step(i, item)
            self.engine.backward(loss)
            if i + 1 < len(micro):
                self.engine.step()  # inside the accumulation window: DeepSpeed only counts it
            losses = losses + loss.detach().float()
            for k, v in metrics.items():
                if isinstance(v, torch.Tensor):
                    device_sums[k] = device_sums.get(k, 0.0) + v.float()
                else:
                    host_sums[k] = host_sums.get(k, 0.0) + float(v)
        keys = sorted(device_sums)
        local = torch.stack([losses] + [device_sums[k] for k in keys])
        decision = self.decide(losses, local, stop_requested=stop_requested, has_data=has_data)
        n = len(micro)
        metrics = {k: v / n for k, v in zip(keys, decision.values[1:])}
        metrics.update({k: v / n for k, v in host_sums.items()})
        return Window(decision, decision.values[0] / n, metrics)

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
