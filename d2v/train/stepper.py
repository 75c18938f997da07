"""The one trainer: one guarded optimizer update of a training unit, for every job.

A unit is what a job trains: pretraining (d2v.train.trainer.PretrainingUnit: the data2vec task,
its teacher and EMA) or a downstream task (d2v.finetune.unit.DownstreamUnit, which runs any task
registered in d2v.finetune.tasks: a new downstream task is a task class there, not a new unit). The stepper owns what every update shares: the LR read, the micro-batches'
backward passes and the one agreed decision (d2v.train.guarded_update), the optimizer step, and
the step counter the update loop and checkpoints read. A unit supplies:

* `begin_update(step)`: per-update settings before the first micro-batch (seeds, freezing);
* `stage(item)`: one micro-batch, ready for `micro_step`, from what the data stream yields;
* `has_data(items)`: whether any micro-batch is real data (filler batches are not);
* `micro_step(batch, step=, micro=)`: batch -> (loss, metrics), the loss already normalised;
* `after_update(step, applied)`: work after the optimizer step (the EMA) of update `step` (0-based,
  the count before this update; StepMetrics.step is the count after it), returning values to log;
* `step_values(items, staged)`: what the update processed (samples, and what else the unit counts);
* `score_keys`, `eval_sums(item, step)` and `summarize(sums)`: evaluation as additive sums per
  batch, keys among `score_keys` (every rank reduces every key, also one with no batch of its
  own), which ranks add before summarize turns them into metrics. The job runs the evaluation
  (its data, when, what it adds): the pretraining run over its held-out shards, a fine-tuning run
  over the task's evaluation split;
* `teacher`: what checkpoints hold besides the engine (None: nothing).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from d2v.train.guarded_update import GuardedCounts, GuardedUpdate


@dataclass
class StepMetrics:
    step: int
    loss: float
    values: dict[str, float] = field(default_factory=dict)


class Unit(Protocol):
    teacher: Any
    score_keys: tuple[str, ...]

    def begin_update(self, step: int) -> None: ...

    def stage(self, item: Any) -> Any: ...

    def has_data(self, items: Sequence[Any]) -> bool: ...

    def micro_step(self, batch: Any, *, step: int, micro: int) -> tuple[torch.Tensor, dict[str, Any]]: ...

    def after_update(self, step: int, applied: bool) -> dict[str, float]: ...

    def step_values(self, items: Sequence[Any], staged: Sequence[Any]) -> dict[str, float]: ...

    def eval_sums(self, item: Any, step: int) -> dict[str, float | torch.Tensor]: ...

    def summarize(self, sums: dict[str, float]) -> dict[str, float]: ...


class Stepper(GuardedCounts):
    """Runs a unit's updates on a DeepSpeed engine: `train_step` is one update over `grad_accum`
    micro-batches. The host waits for the device once per update, for the decision every rank
    agrees on (finite loss and gradients, any real data, a stop request); the step's metrics come
    back in the same read."""

    def __init__(self, engine, scheduler, unit: Unit, model: torch.nn.Module, grad_accum: int,
                 device: torch.device) -> None:
        self.engine, self.scheduler, self.unit, self.device = engine, scheduler, unit, device
        self.grad_accum = grad_accum
        self.teacher = unit.teacher
        self._model = model
        self.step = 0  # optimizer updates done
        self.stop_agreed = False  # a rank asked to stop (preemption): agreed in the step's decision
        self.update = GuardedUpdate(engine, model, grad_accum, device)

    def train_step(self, micro_batches: Sequence[Any], *, stop_requested: bool = False) -> StepMetrics:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches for grad_accum={self.grad_accum}")
        t0 = time.perf_counter()
        self._model.train()
        lr = float(self.scheduler.get_last_lr()[0])
        unit, step = self.unit, self.step
        unit.begin_update(step)
        staged = [unit.stage(b) for b in micro_batches]
        window = self.update.window(staged, lambda i, batch: unit.micro_step(batch, step=step, micro=i),
                                    stop_requested=stop_requested, has_data=unit.has_data(micro_batches))
        self.stop_agreed = window.decision.stop
        if window.decision.outcome != "update":
            values = {**self.update.skip(window.decision), "lr": lr, "step_time": time.perf_counter() - t0}
            return StepMetrics(self.step, float("nan"), values)
        self.engine.step()
        applied = getattr(self.engine, "was_step_applied", lambda: True)()
        after = unit.after_update(step, applied)
        self.step += 1
        values = {**window.metrics, **after, "lr": lr, **unit.step_values(micro_batches, staged),
                  "step_time": time.perf_counter() - t0}
        return StepMetrics(self.step, window.loss, values)


__all__ = ["StepMetrics", "Stepper", "Unit"]
