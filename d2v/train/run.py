"""A whole pretraining run: trainer + batch stream + metrics sink + checkpoints + validation.

Used by `launchers/pretrain.py` (every launcher: deepspeed, OpenMPI, Slurm, single process) and
by the tests in-process. Ranks agree on everything through deterministic streams and a few
all-reduces at log, validation and checkpoint steps.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from d2v import collectives
from d2v.config import to_dict
from d2v.config.deepspeed_json import zero_stage
from d2v.config.batch_plan import BatchPlan
from d2v.config.modalities import modality_spec
from d2v.config.schema import D2vConfig, is_frozen
from d2v.train.identity import check_resume, run_identity
from d2v.train.loop import UpdateLoop, with_universal_load
from d2v.train import distributed
from d2v.train.streams import BatchStream
from d2v.train.throughput_log import interval_values, peak_tflops
from d2v.train.trainer import Trainer

StreamFactory = Callable[[int, int], BatchStream]


class CollapseError(RuntimeError):
    pass


class Run(UpdateLoop):
    window_keys = ("target_std", "pred_std", "mask_rate")
    rate_keys = ("samples", "positions", "flops")

    def __init__(self, cfg: D2vConfig, ds_template: dict[str, Any], make_stream: StreamFactory, *,
                 batch_plan: BatchPlan, make_val_stream: StreamFactory | None = None, resume: str = "none",
                 console: bool = True, init_from: str | None = None) -> None:
        """cfg: the frozen run config of this world size (d2v.config.batch_plan.run_config)."""
        if not is_frozen(cfg):
            raise TypeError("Run reads a resolved run config: build it with d2v.train.launch.build_run")
        self.cfg = cfg
        self.out_dir = cfg.train.out_dir
        self.rank, self.world_size = distributed.init_distributed()
        if batch_plan.world_size != self.world_size:
            raise ValueError(f"the run config was planned for {batch_plan.world_size} ranks but {self.world_size} "
                             f"joined: start the ranks with WORLD_SIZE set (deepspeed, torchrun, srun, mpirun do)")
        # The reference run's global batch at this world size (or the config's own, said so).
        self.batch_plan = batch_plan
        self.open_run_directory(lambda note: self._start(cfg, ds_template, make_stream, make_val_stream, resume,
                                                         console, init_from, note))

    def _start(self, cfg, ds_template, make_stream, make_val_stream, resume, console, init_from, lock_note) -> None:
        # Everything about the resume is checked before any engine is built: the checkpoint must
        # be this run's (identity), and what changed since is said in the log.
        stage = zero_stage(ds_template)  # filling the template (the trainer's job) keeps its stage
        self.identity = run_identity(cfg, world_size=self.world_size, zero_stage=stage)
        state, reshard = self.plan_checkpoints(resume, stage)
        resume_notes = check_resume(state, cfg, self.identity, tag=self.resume_tag, out_dir=self.out_dir) \
            if state is not None else []
        if reshard:
            ds_template = with_universal_load(ds_template)
        student, self.init_report = self._init_student(init_from)
        self.trainer = self.stepper = Trainer(cfg, ds_template, student=student)
        self.val_every = cfg.train.val_every
        if self.init_report is not None and self.init_report.teacher is not None:
            self.trainer.teacher.load_state(self.init_report.teacher)
        self.stream = make_stream(self.rank, self.world_size)
        # Built now, not at the first validation: a held-out set too small for this many ranks
        # fails the run before it trains, not hours in.
        self.val_stream = make_val_stream(self.rank, self.world_size) if make_val_stream is not None else None
        self.console = console
        self.finish_start(to_dict(cfg), universal=reshard,
                          positions_name=modality_spec(cfg.model.modality).position_name)
        self.sink.message(self.batch_plan.message)
        if lock_note:
            self.sink.message(f"{self.out_dir}: {lock_note}")
        for note in resume_notes:
            self.sink.message(f"resume from {self.resume_tag}: {note}")
        for line in self.trainer.attention_plan:
            self.sink.message(f"attention {line}")
        self.peak_tflops, peak_source = peak_tflops(cfg, self.trainer.device)
        self.sink.message(f"optimizer: {self.trainer.optimizer_name}; MFU against "
                          + (f"{self.peak_tflops:g} TFLOP/s ({peak_source})" if self.peak_tflops else
                             f"nothing: {peak_source}"))

    # -- checkpoints -------------------------------------------------------------------------
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

    def run_state(self) -> dict[str, Any]:
        return {"config": to_dict(self.cfg), "identity": self.identity}

    # -- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        if self.val_stream is None:
            return None
        stream, trainer = self.val_stream, self.trainer
        unit = trainer.unit
        trainer.student.eval()
        # Every rank reduces the same keys, also one whose share of the held-out set is empty.
        sums: dict[str, float | torch.Tensor] = dict.fromkeys(unit.score_keys, 0.0)
        stopped = False
        for batch in stream:
            # A stop request is agreed between batches (every rank runs the same forward passes):
            # a long validation must not outlast the launcher's grace period before the checkpoint.
            if collectives.any_rank(self.preemption.requested):
                stopped = True
                break
            for k, v in unit.eval_sums(batch, trainer.step).items():
                sums[k] = sums[k] + v
        trainer.student.train()
        if stopped:
            self.sink.message(f"step {trainer.step}: validation stopped early for the stop request")
            return None
        stats = getattr(stream, "stats", {})
        keys = ("corrupt", "missing", "filler_batches")
        names = sorted(sums)
        summed = collectives.all_reduce_values([float(sums[k]) for k in names] + [stats.get(k, 0) for k in keys])
        totals = dict(zip(names, summed))
        lost = dict(zip(("corrupt_samples", "missing_samples", "filler_batches"), summed[len(names):]))
        if not totals.get("loss_count"):
            from d2v.train.loop import NoDataError

            raise NoDataError(f"validation at step {trainer.step} found no readable sample in "
                              f"{self.cfg.data.val_shards} ({ {k: int(v) for k, v in lost.items() if v} }): a loss "
                              f"of nothing is no result; check the validation shards (the log names each damaged "
                              f"shard) or re-run prepare")
        return {**unit.summarize(totals), "samples_left_out": float(getattr(stream, "left_out", 0)), **lost}

    # -- what the loop asks of this job ---------------------------------------------------------
    def log_values(self, step: int, m, totals: dict[str, float], elapsed: float) -> dict[str, float]:
        cfg, trainer = self.cfg, self.trainer
        model_norm, ema_norm = trainer.norms()
        return dict(ema_decay=m.values["ema_decay"], lr=m.values["lr"], grad_norm=trainer.grad_norm(),
                    model_norm=model_norm, ema_norm=ema_norm,
                    **interval_values(cfg, samples=totals["samples"], positions=totals["positions"],
                                      flops=totals["flops"], elapsed=elapsed, world_size=self.world_size,
                                      peak=self.peak_tflops, device=trainer.device))

    def guard(self, step: int, values: dict[str, float]) -> None:
        lo = self.cfg.loss
        if step < lo.guard_after:
            return
        if lo.min_target_std > 0 and values["target_std"] < lo.min_target_std:
            raise CollapseError(f"step {step}: target std {values['target_std']:.4f} < loss.min_target_std="
                                f"{lo.min_target_std}: the teacher collapsed; lower optim.lr or lengthen the warmup")
        if lo.min_pred_std > 0 and values["pred_std"] < lo.min_pred_std:
            raise CollapseError(f"step {step}: prediction std {values['pred_std']:.4f} < loss.min_pred_std="
                                f"{lo.min_pred_std}: the student collapsed; lower optim.lr or lengthen the warmup")

    def close(self) -> None:
        self.preemption.uninstall()
        self.sink.close()
        if self.lock is not None:
            self.lock.release()
