"""Fine-tuning on a DeepSpeed engine (1 or more ranks; ZeRO 0-2): the downstream task is a unit
(d2v.finetune.unit) of the one trainer (d2v.train.stepper), run by the same update loop as
pretraining (d2v.train.loop): NaN/inf windows skipped on every rank, preemption to a checkpoint
and exit 75, atomic checkpoints with `--resume auto`, the same metrics sink. What is particular to
fine-tuning: data-parallel batches from an in-memory task, an optional head-only warm-up,
evaluation sharded over ranks with summed counts, and `finetune.json` (config, labels, results).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import torch

from d2v import collectives
from d2v.config import to_dict
from d2v.config.deepspeed_json import zero_stage
from d2v.finetune.config import FinetuneConfig
from d2v.finetune.model import FinetuneModel, load_backbone
from d2v.finetune.tasks import build_task
from d2v.finetune.unit import DownstreamUnit
from d2v.train import distributed
from d2v.train.checkpoint import atomic_write_text
from d2v.train.engine import start_engine
from d2v.train.loop import UpdateLoop, with_universal_load
from d2v.train.stepper import Stepper
from d2v.train.trainer import DTYPES


def rank_batches(n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's index lists for one epoch: a seeded permutation cut into global batches of
    batch_size x world_size (the incomplete last one dropped, so every rank runs the same number
    of steps), each rank taking its own slice."""
    glob = batch_size * world_size
    if n < glob:
        raise ValueError(f"{n} training examples cannot fill one global batch of {glob} "
                         f"(train.micro_batch_size={batch_size} x {world_size} ranks); lower train.micro_batch_size")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[b * glob + rank * batch_size: b * glob + (rank + 1) * batch_size] for b in range(n // glob)]


def _sum(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    return dict(zip(keys, collectives.all_reduce_values([values[k] for k in keys])))


class TaskStream:
    """This rank's index lists, epoch after epoch (rank_batches, or the task's own plan of an
    epoch), with a resumable position."""

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int,
                 plan: Callable[[int], list[list[int]]] | None = None) -> None:
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self.plan = plan
        self.epoch, self.consumed = 0, 0
        self._batches = self._epoch_batches()

    def _epoch_batches(self) -> list[list[int]]:
        if self.plan is not None:
            return self.plan(self.epoch)
        return rank_batches(self.size, self.batch_size, self.rank, self.world_size, self.seed, self.epoch)

    @property
    def steps_per_epoch(self) -> int:
        return len(self._batches)

    def next_batch(self) -> list[int]:
        if self.consumed >= len(self._batches):
            self.epoch, self.consumed = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        self.consumed += 1
        return self._batches[self.consumed - 1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._batches = self._epoch_batches()

    def restart_epoch(self, epoch: int) -> None:
        self.load_state_dict({"epoch": epoch, "consumed": 0})

    def counters(self) -> dict[str, int]:
        return {}


class FinetuneRun(UpdateLoop):
    validate_at_end = False  # train() evaluates once after the last update

    def __init__(self, cfg: FinetuneConfig, ds_template: dict[str, Any], *, random_init: bool = False,
                 resume: str = "none", console: bool = True) -> None:
        self.cfg = cfg
        self.random_init = random_init
        self.console = console
        self.rank, self.world_size = distributed.init_distributed()
        self.device = distributed.device()
        self.out_dir = cfg.train.out_dir
        self.open_run_directory(lambda note: self._start(cfg, ds_template, random_init, resume))

    def _start(self, cfg: FinetuneConfig, ds_template: dict[str, Any], random_init: bool, resume: str) -> None:
        if zero_stage(ds_template) == 3:  # before anything is loaded
            raise ValueError("fine-tuning runs ZeRO stages 0-2 (its sharded evaluation is not ZeRO-3 safe); "
                             "use ds_configs/cpu.json or a stage-1/2 template")
        distributed.set_cpu_threads(cfg.train.threads)
        state, reshard = self.plan_checkpoints(resume)
        if reshard:
            ds_template = with_universal_load(ds_template)
        if state is not None:
            self._check_same_run(state)
        self.task = build_task(cfg)
        backbone = load_backbone(cfg.init, cfg.model, random_init=random_init, seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed + 1)  # the head's init does not depend on how the backbone was made
        model = FinetuneModel(backbone, self.task.head(backbone.embed_dim), dropout=cfg.finetune.head_dropout,
                              masking=self.task.feature_masking(cfg))
        self.task.prepare_model(model, cfg)
        parts = start_engine(model, cfg, ds_template, self.world_size,
                             self.task.param_groups(model, cfg))
        self.engine, self.scheduler, self.ds_config = parts.engine, parts.scheduler, parts.ds_config
        self.model: FinetuneModel = self.engine.module
        self.unit = DownstreamUnit(self.task, self.engine, cfg, self.device, DTYPES[cfg.train.precision])
        self.stepper = Stepper(self.engine, self.scheduler, self.unit, self.model, cfg.train.grad_accum, self.device)
        self.stream = TaskStream(self.task.size("train"), cfg.train.micro_batch_size, self.rank, self.world_size,
                                 cfg.train.seed, plan=self.task.epoch_plan(cfg, self.rank, self.world_size))
        self.val_every = cfg.finetune.eval_every
        self.finish_start(to_dict(cfg), universal=reshard)

    def _run_identity(self) -> dict[str, Any]:
        return {"task": self.cfg.task, "init": self.cfg.init, "random_init": self.random_init,
                "train_data": self.cfg.finetune.train_data}

    def _check_same_run(self, state: dict[str, Any]) -> None:
        """A resume continues the same fine-tuning: another init, task or data in the same --out
        would report the old run's weights as the new run's results."""
        mine = self._run_identity()
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            differ = ", ".join(f"{k} {theirs[k]!r} -> {mine[k]!r}" for k in mine if theirs[k] != mine[k])
            raise FileExistsError(f"{self.checkpointer.root} holds a different fine-tuning run ({differ}): "
                                  f"give this run a new --out")

    @property
    def step(self) -> int:
        return self.stepper.step

    def train_step(self, indices: list[int]) -> float:
        """One update on one micro-batch of training indices (train.grad_accum must be 1)."""
        return self.stepper.train_step([indices]).loss

    # -- what the loop asks of this job ------------------------------------------------------------
    def log_values(self, step: int, m, totals: dict[str, float], elapsed: float) -> dict[str, float]:
        return {"lr": m.values["lr"], "epoch": float(self.stream.epoch),
                "samples_per_s": totals["samples"] / max(elapsed, 1e-9)}

    def validate(self) -> dict[str, float]:
        return self.evaluate()

    def run_state(self) -> dict[str, Any]:
        return {**self._run_identity(), "labels": self.task.labels}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics on the whole evaluation split; every rank scores a strided share."""
        self.model.eval()
        mine = list(range(self.rank, self.task.size("eval"), self.world_size))
        bs = self.cfg.finetune.eval_batch_size
        # Every rank reduces the same keys, also one left without evaluation examples.
        sums = dict.fromkeys(self.unit.score_keys, 0.0)
        for start in range(0, len(mine), bs):
            for k, v in self.unit.eval_sums(mine[start:start + bs], self.step).items():
                sums[k] += v
        return self.unit.summarize(_sum(sums))

    def train(self, max_steps: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        summary = UpdateLoop.train(self, max_steps)
        logged = [r["loss"] for r in self.logged]
        metrics = {} if summary.preempted else self.evaluate()
        if metrics:
            self.sink.log(self.step, metrics, prefix="eval", console=self.console)
        result = {"task": cfg.task, "init": cfg.init, "random_init": self.random_init, "steps": self.step,
                  "train_examples": self.task.size("train"), "eval_examples": self.task.size("eval"),
                  "first_loss": logged[0] if logged else None, "last_loss": logged[-1] if logged else None,
                  "metrics": metrics, "skipped_steps": summary.skipped_steps, "preempted": summary.preempted,
                  "train_seconds": round(time.perf_counter() - t0, 1),
                  "checkpoint": os.path.join(self.checkpointer.root, summary.checkpoint)}
        if self.rank == 0 and not summary.preempted:
            atomic_write_text(os.path.join(cfg.train.out_dir, "finetune.json"),
                              json.dumps({"result": result, "labels": self.task.labels, "config": to_dict(cfg)},
                                         indent=2))
        return result

    def close(self) -> None:
        """Ranks leave the process group together: one exiting while another still tears down its
        communication threads aborted that one at interpreter exit (seen once in ~10 launches)."""
        self.preemption.uninstall()
        self.sink.close()
        if self.lock is not None:
            self.lock.release()
        distributed.shutdown()


__all__ = ["FinetuneRun", "TaskStream", "rank_batches"]
