"""A whole pretraining run: trainer + batch stream + metrics sink + checkpoints + validation.

Used by `launchers/pretrain.py` (every launcher: deepspeed, OpenMPI, Slurm, single process) and
by the tests in-process. Ranks agree on everything through deterministic streams and a few
all-reduces at log, validation and checkpoint steps.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from d2v.config import to_dict
from d2v.config.schema import D2vConfig
from d2v.train.checkpoint import Checkpointer
from d2v.train.metrics import MetricsSink
from d2v.train.streams import BatchStream
from d2v.train.trainer import Trainer

StreamFactory = Callable[[int, int], BatchStream]


class CollapseError(RuntimeError):
    pass


@dataclass
class RunSummary:
    steps: int
    first_loss: float | None
    last_loss: float | None
    out_dir: str
    checkpoint: str | None
    history: list[dict[str, Any]]


def _all_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    if world_size == 1 or not values:
        return values
    import deepspeed.comm as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world_size for k, v in zip(keys, t.tolist())}


def _all_sum(values: list[float], world_size: int) -> list[float]:
    if world_size == 1:
        return values
    import deepspeed.comm as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class Run:
    def __init__(self, cfg: D2vConfig, ds_template: dict[str, Any], make_stream: StreamFactory, *,
                 make_val_stream: StreamFactory | None = None, resume: str = "none", console: bool = True) -> None:
        self.cfg = cfg
        self.trainer = Trainer(cfg, ds_template)
        self.rank, self.world_size = self.trainer.rank, self.trainer.world_size
        self.out_dir = cfg.train.out_dir
        self.stream = make_stream(self.rank, self.world_size)
        self.make_val_stream = make_val_stream
        self.checkpointer = Checkpointer(os.path.join(self.out_dir, "checkpoints"), rank=self.rank,
                                         world_size=self.world_size, keep_last=cfg.train.keep_last)
        self.console = console
        self.last_checkpoint: str | None = None
        if resume != "none":
            self._resume(resume)
        self.sink = MetricsSink(self.out_dir, rank=self.rank, max_steps=cfg.train.max_steps,
                                wandb_mode=cfg.train.wandb, run_config=to_dict(cfg), start_step=self.trainer.step)
        if self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "config.json"), "w") as f:
                json.dump(to_dict(cfg), f, indent=2)

    # -- checkpoints -------------------------------------------------------------------------
    def _resume(self, resume: str) -> None:
        tag = self.checkpointer.latest_tag() if resume == "auto" else resume
        if tag is None:
            return  # nothing saved yet: start from scratch
        run_state, side = self.checkpointer.load(self.trainer.engine, self.trainer.teacher, tag)
        if run_state.get("preset") != self.cfg.name:
            raise ValueError(f"checkpoint {tag} in {self.out_dir} was written by preset {run_state.get('preset')!r}, "
                             f"this run is {self.cfg.name!r}: use another --out or the same preset")
        self.trainer.step = int(run_state["step"])
        if side is not None:
            self.stream.load_state_dict(side["data"])
        elif hasattr(self.stream, "restart_epoch"):
            self.stream.restart_epoch(int(run_state.get("epoch", 0)))
        self.last_checkpoint = tag

    def save(self) -> str:
        data = self.stream.state_dict()
        tag = self.checkpointer.save(
            self.trainer.engine, self.trainer.teacher, self.trainer.step,
            run_state={"preset": self.cfg.name, "epoch": int(data.get("epoch", 0)), "config": to_dict(self.cfg)},
            rank_state={"data": data})
        self.last_checkpoint = tag
        return tag

    # -- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        if self.make_val_stream is None:
            return None
        stream = self.make_val_stream(self.rank, self.world_size)
        task, trainer = self.trainer.task, self.trainer
        trainer.student.eval()
        total, count = 0.0, 0.0
        for batch in stream:
            out = task(batch.to(trainer.device, trainer.dtype), step=trainer.step)
            total += out.metrics["loss_sum"]
            count += out.metrics["loss_count"]
        trainer.student.train()
        total, count = _all_sum([total, count], self.world_size)
        return {"loss": total / max(count, 1.0), "targets": count}

    # -- the loop ----------------------------------------------------------------------------
    def _guard(self, step: int, values: dict[str, float]) -> None:
        lo = self.cfg.loss
        if step < lo.guard_after:
            return
        if lo.min_target_std > 0 and values["target_std"] < lo.min_target_std:
            raise CollapseError(f"step {step}: target std {values['target_std']:.4f} < loss.min_target_std="
                                f"{lo.min_target_std}: the teacher collapsed; lower optim.lr or lengthen the warmup")
        if lo.min_pred_std > 0 and values["pred_std"] < lo.min_pred_std:
            raise CollapseError(f"step {step}: prediction std {values['pred_std']:.4f} < loss.min_pred_std="
                                f"{lo.min_pred_std}: the student collapsed; lower optim.lr or lengthen the warmup")

    def train(self, max_steps: int | None = None) -> RunSummary:
        cfg, trainer = self.cfg, self.trainer
        stop = cfg.train.max_steps if max_steps is None else max_steps
        history: list[dict[str, Any]] = []
        window: dict[str, float] = {}
        window_steps, window_samples, t_window = 0, 0.0, time.perf_counter()
        while trainer.step < stop:
            micro = [self.stream.next_batch() for _ in range(cfg.train.grad_accum)]
            m = trainer.train_step(micro)
            step = trainer.step
            history.append({"step": step, "loss": m.loss, **m.values})
            for k in ("target_std", "pred_std", "mask_rate"):
                window[k] = window.get(k, 0.0) + m.values[k]
            window["loss"] = window.get("loss", 0.0) + m.loss
            window_steps += 1
            window_samples += m.values["samples"]
            self.sink.progress(step)
            if step % cfg.train.log_every == 0 or step == stop:
                values = {k: v / window_steps for k, v in window.items()}
                values = _all_mean(values, self.world_size)
                elapsed = time.perf_counter() - t_window
                samples = _all_sum([window_samples], self.world_size)[0]
                counters = {k: float(v) for k, v in self.stream.counters().items()}
                counters = {k: v * self.world_size for k, v in _all_mean(counters, self.world_size).items()}
                model_norm, ema_norm = trainer.norms()
                values.update(ema_decay=m.values["ema_decay"], lr=m.values["lr"], grad_norm=m.values["grad_norm"],
                              model_norm=model_norm, ema_norm=ema_norm,
                              samples_per_s=samples / max(elapsed, 1e-9), **counters)
                self.sink.log(step, values, console=self.console)
                self._guard(step, values)
                window, window_steps, window_samples, t_window = {}, 0, 0.0, time.perf_counter()
            if cfg.train.val_every and step % cfg.train.val_every == 0:
                val = self.validate()
                if val is not None:
                    self.sink.log(step, val, prefix="valid", console=self.console)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != stop:
                self.save()
        if self.last_checkpoint != f"step_{trainer.step:08d}":
            self.save()
        return RunSummary(trainer.step, history[0]["loss"] if history else None,
                          history[-1]["loss"] if history else None, self.out_dir, self.last_checkpoint, history)

    def close(self) -> None:
        self.sink.close()
