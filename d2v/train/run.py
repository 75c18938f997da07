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

from d2v import collectives
from d2v.config import to_dict
from d2v.config.batch_plan import apply_batch_plan
from d2v.config.modalities import modality_spec
from d2v.config.schema import D2vConfig
from d2v.train.checkpoint import Checkpointer
from d2v.train.metrics import MetricsSink
from d2v.train import distributed, host_sync
from d2v.train.preemption import PreemptionFlag
from d2v.train.streams import BatchStream
from d2v.train.throughput_log import interval_values, peak_tflops
from d2v.train.trainer import Trainer

StreamFactory = Callable[[int, int], BatchStream]


class CollapseError(RuntimeError):
    pass


class NonFiniteError(RuntimeError):
    """Too many updates in a row were skipped for NaN/inf; a checkpoint of the last good state exists."""


EXIT_NONFINITE = 3


@dataclass
class RunSummary:
    steps: int
    preempted: bool
    skipped_steps: int
    first_loss: float | None
    last_loss: float | None
    out_dir: str
    checkpoint: str | None
    history: list[dict[str, Any]]


class Run:
    def __init__(self, cfg: D2vConfig, ds_template: dict[str, Any], make_stream: StreamFactory, *,
                 make_val_stream: StreamFactory | None = None, resume: str = "none", console: bool = True,
                 init_from: str | None = None) -> None:
        self.cfg = cfg
        self.out_dir = cfg.train.out_dir
        self.rank, self.world_size = distributed.init_distributed()
        # The reference run's global batch at this world size (or the config's own, said so).
        self.batch_plan = apply_batch_plan(cfg, self.world_size)
        if self.rank == 0 and console:
            print(self.batch_plan.message, flush=True)
        self.checkpointer = Checkpointer(os.path.join(self.out_dir, "checkpoints"), rank=self.rank,
                                         world_size=self.world_size, keep_last=cfg.train.keep_last)
        # Everything about the resume is checked before any engine is built.
        self.resume_tag, resume_state = self._plan_resume(resume)
        reshard = resume_state is not None and self._needs_universal(resume_state)
        if reshard:
            ds_template = {**ds_template, "checkpoint": {**ds_template.get("checkpoint", {}), "load_universal": True}}
        student, self.init_report = self._init_student(init_from)
        self.trainer = Trainer(cfg, ds_template, student=student)
        if self.init_report is not None and self.init_report.teacher is not None:
            self.trainer.teacher.load_state(self.init_report.teacher)
        self.stream = make_stream(self.rank, self.world_size)
        self.make_val_stream = make_val_stream
        self.console = console
        self.last_checkpoint: str | None = None
        self.preemption = PreemptionFlag(self.world_size).install()
        if self.resume_tag is not None:
            self._resume(self.resume_tag, universal=reshard)
        self.sink = MetricsSink(self.out_dir, rank=self.rank, max_steps=cfg.train.max_steps,
                                wandb_mode=cfg.train.wandb, run_config=to_dict(cfg), start_step=self.trainer.step,
                                positions_name=modality_spec(cfg.model.modality).position_name)
        for line in self.trainer.attention_plan:
            self.sink.message(f"attention {line}")
        self.peak_tflops, peak_source = peak_tflops(cfg, self.trainer.device)
        self.sink.message(f"optimizer: {self.trainer.optimizer_name}; MFU against "
                          + (f"{self.peak_tflops:g} TFLOP/s ({peak_source})" if self.peak_tflops else
                             f"nothing: {peak_source}"))
        if self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "config.json"), "w") as f:
                json.dump(to_dict(cfg), f, indent=2)

    # -- checkpoints -------------------------------------------------------------------------
    def _plan_resume(self, resume: str) -> tuple[str | None, dict[str, Any] | None]:
        if resume == "none":
            return None, None
        tag = self.checkpointer.latest_tag() if resume == "auto" else resume
        if tag is None:
            return None, None  # nothing saved yet: start from scratch
        state = self.checkpointer.run_state(tag)
        if state.get("preset") != self.cfg.name:
            raise ValueError(f"checkpoint {tag} in {self.out_dir} was written by preset {state.get('preset')!r}, "
                             f"this run is {self.cfg.name!r}: use another --out or the same preset")
        return tag, state

    def _init_student(self, init_from: str | None):
        """The student loaded from pretrained weights (--init-from); a resumed run ignores them."""
        if init_from is None:
            return None, None
        if self.resume_tag is not None:
            if self.rank == 0:
                print(f"--init-from {init_from} ignored: resuming from checkpoint {self.resume_tag}")
            return None, None
        from d2v.interop import init_from as load_pretrained
        from d2v.models import build_model

        torch.manual_seed(self.cfg.train.seed)  # the same fresh head on every rank
        student = build_model(self.cfg)
        report = load_pretrained(student, init_from, self.cfg)
        if self.rank == 0:
            print(report.summary())
        return student, report

    def _needs_universal(self, state: dict[str, Any]) -> bool:
        """A ZeRO checkpoint written at another world size is loaded through DeepSpeed's
        universal form (a stage-0 checkpoint holds whole tensors and loads anywhere)."""
        import glob

        if state["world_size"] == self.world_size:
            return False
        tag_dir = os.path.join(self.checkpointer.root, self.resume_tag or "")
        return bool(glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*optim_states.pt")))

    def _resume(self, tag: str, *, universal: bool) -> None:
        run_state, side = self.checkpointer.load(self.trainer.engine, self.trainer.teacher, tag, universal=universal)
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
        total, count = torch.zeros((), dtype=torch.float64, device=trainer.device), 0.0
        for batch in stream:
            out = task(trainer.stage(batch), step=trainer.step)
            total += out.metrics["loss_sum"].double()
            count += out.metrics["loss_count"]
        trainer.student.train()
        total, count = collectives.all_reduce_values([float(total), count])
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
        window_steps, t_window = 0, time.perf_counter()
        rates = {"samples": 0.0, "positions": 0.0, "flops": 0.0}  # summed over the window, then over ranks
        while trainer.step < stop:
            with host_sync.host_work():  # the data stream works on host memory only
                micro = [self.stream.next_batch() for _ in range(cfg.train.grad_accum)]
            # The stop request rides on the step's one synchronisation: every rank learns it there.
            m = trainer.train_step(micro, stop_requested=self.preemption.requested)
            step = trainer.step
            history.append({"step": step, "loss": m.loss, **m.values})
            if trainer.stop_agreed:
                self.sink.message(f"step {trainer.step}: {self.preemption.signal_name or 'a signal on another rank'}"
                                  f" -> checkpoint and exit for requeue")
                self.save()
                return self._summary(history, preempted=True)
            if m.values.get("skipped"):
                self.sink.log(step, {"skipped_steps": m.values["skipped_steps"]}, prefix="skip", console=self.console)
                if trainer.consecutive_skips >= cfg.train.max_consecutive_skips:
                    tag = self.save()
                    raise NonFiniteError(
                        f"{trainer.consecutive_skips} updates in a row had a NaN/inf loss or gradient (at step {step}); "
                        f"stopped with checkpoint {tag} of the last good state: lower optim.lr, check the data, "
                        f"or raise train.max_consecutive_skips")
                continue
            for k in ("target_std", "pred_std", "mask_rate"):
                window[k] = window.get(k, 0.0) + m.values[k]
            window["loss"] = window.get("loss", 0.0) + m.loss
            window_steps += 1
            for k in rates:
                rates[k] += m.values[k]
            self.sink.progress(step)
            if step % cfg.train.log_every == 0 or step == stop:
                values = {k: v / window_steps for k, v in window.items()}
                elapsed = time.perf_counter() - t_window
                counters = {k: float(v) for k, v in self.stream.counters().items()}
                # One collective for the window: means of the metrics, sums of samples and counters.
                keys = sorted(values)
                ckeys = sorted(counters)
                rkeys = sorted(rates)
                summed = collectives.all_reduce_values([values[k] for k in keys] + [rates[k] for k in rkeys] +
                                                       [counters[k] for k in ckeys])
                values = {k: v / self.world_size for k, v in zip(keys, summed)}
                totals = dict(zip(rkeys, summed[len(keys):len(keys) + len(rkeys)]))
                counters = dict(zip(ckeys, summed[len(keys) + len(rkeys):]))
                counters["skipped_steps"] = float(trainer.skipped_steps)
                model_norm, ema_norm = trainer.norms()
                values.update(ema_decay=m.values["ema_decay"], lr=m.values["lr"], grad_norm=trainer.grad_norm(),
                              model_norm=model_norm, ema_norm=ema_norm, **counters,
                              **interval_values(cfg, samples=totals["samples"], positions=totals["positions"],
                                                flops=totals["flops"], elapsed=elapsed, world_size=self.world_size,
                                                peak=self.peak_tflops, device=trainer.device))
                self.sink.log(step, values, console=self.console)
                self._guard(step, values)
                window, window_steps, t_window = {}, 0, time.perf_counter()
                rates = dict.fromkeys(rates, 0.0)
            if cfg.train.val_every and step % cfg.train.val_every == 0:
                val = self.validate()
                if val is not None:
                    self.sink.log(step, val, prefix="valid", console=self.console)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != stop:
                self.save()
        if self.last_checkpoint != f"step_{trainer.step:08d}":
            self.save()
        return self._summary(history, preempted=False)

    def _summary(self, history: list[dict[str, Any]], *, preempted: bool) -> RunSummary:
        losses = [h["loss"] for h in history if not h.get("skipped")]
        return RunSummary(self.trainer.step, preempted, self.trainer.skipped_steps, losses[0] if losses else None,
                          losses[-1] if losses else None, self.out_dir, self.last_checkpoint, history)

    def close(self) -> None:
        self.preemption.uninstall()
        self.sink.close()
