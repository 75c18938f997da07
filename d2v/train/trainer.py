"""The engine loop: backward, optimizer step, EMA update, metrics.

Everything a batch computes lives in `d2v.task`; checkpoints, logging sinks and the data
pipeline are composed around this class by the launcher.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from d2v.batch import Batch
from d2v.config import fill_ds_config
from d2v.config.schema import D2vConfig
from d2v.models import Data2Vec, build_model
from d2v.task import Data2VecTask
from d2v.teacher import Teacher
from d2v.train import distributed
from d2v.train.ds_checks import check_ds_config
from d2v.train.schedule import lr_factor

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def param_group_names(model: torch.nn.Module, no_decay_1d: bool) -> list[list[str]]:
    """Names of the optimizer's parameter groups, in order: one group, or two with the exempt ones
    second: biases and other 1-D parameters (when no_decay_1d) and parameters the model factory
    marked (BEiT's CLS token). Export relies on this order too."""
    from d2v.models.factory import NO_WEIGHT_DECAY

    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    exempt = {n for n in names if getattr(params[n], NO_WEIGHT_DECAY, False) or (no_decay_1d and params[n].ndim < 2)}
    if not exempt and not no_decay_1d:
        return [names]
    return [[n for n in names if n not in exempt], [n for n in names if n in exempt]]


def param_groups(model: torch.nn.Module, no_decay_1d: bool, weight_decay: float) -> list[dict[str, Any]]:
    params = dict(model.named_parameters())
    groups = param_group_names(model, no_decay_1d)
    decays = [weight_decay, 0.0]
    return [{"params": [params[n] for n in names], "weight_decay": decays[i]} for i, names in enumerate(groups)]


@dataclass
class StepMetrics:
    step: int
    loss: float
    values: dict[str, float] = field(default_factory=dict)


def compile_blocks(encoder: torch.nn.Module) -> None:
    """torch.compile each block's forward only: module hooks (DeepSpeed's) stay outside the graph."""
    for block in encoder.blocks:
        block.forward = torch.compile(block.forward)


class Trainer:
    """Owns the DeepSpeed engine, the teacher and the task for one run."""

    def __init__(self, cfg: D2vConfig, ds_template: dict[str, Any], *, student: Data2Vec | None = None) -> None:
        import deepspeed

        self.cfg = cfg
        self.rank, self.world_size = distributed.init_distributed()
        self.device = distributed.device()
        distributed.set_cpu_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        student = student if student is not None else build_model(cfg)
        student.encoder.checkpoint_blocks = cfg.train.activation_checkpointing
        if cfg.train.precision == "fp16":
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():
                raise ValueError("train.precision=fp16 is not supported by DeepSpeed on this device (its CPU "
                                 "accelerator runs bf16 and fp32 only); use train.precision=bf16")
        # The teacher is copied from the fp32 student before DeepSpeed casts or partitions it.
        self.teacher = Teacher(student, cfg.teacher).place(self.device)
        self.ds_config = fill_ds_config(ds_template, cfg, self.world_size, on_cpu=distributed.on_cpu())
        check_ds_config(self.ds_config)
        factor = lr_factor(cfg.optim, cfg.train.max_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=student,
            model_parameters=param_groups(student, cfg.optim.no_decay_1d, cfg.optim.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        )
        self.student: Data2Vec = self.engine.module
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        if self.zero_stage == 3:
            self.teacher.attach_zero3(self.student, self.ds_config)
        else:
            self.teacher.bind(self.student)
        if cfg.train.compile:
            if self.zero_stage == 3:
                raise ValueError("train.compile=true does not work with ZeRO stage 3 (its hooks gather and release "
                                 "parameters around each block); use stage 1 or 2, or train.compile=false")
            compile_blocks(self.student.encoder)
            compile_blocks(self.teacher.model.encoder)
        self.dtype = DTYPES[cfg.train.precision]
        task_class = Data2VecTask
        if cfg.model.v2.enabled:
            from d2v.task_v2 import Data2VecV2Task as task_class  # docs/method.md §3.3
        self.task = task_class(self.student, self.teacher, cfg,
                                 normalizer=distributed.global_count_normalizer(self.world_size),
                                 compute_dtype=self.dtype, forward=self.engine)
        self.step = 0  # optimizer updates done
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient
        self.consecutive_skips = 0
        self._grad_sum = torch.zeros(())
        for p in self.student.parameters():
            if p.requires_grad:
                p.register_hook(self._check_grad)

    def _check_grad(self, grad: torch.Tensor) -> torch.Tensor:
        # Runs in autograd before DeepSpeed's own gradient hooks. A NaN/inf anywhere makes the
        # running sum non-finite: one reduction per gradient, no host sync until the step.
        self._grad_sum = self._grad_sum.to(grad.device) + grad.sum(dtype=torch.float32)
        return grad

    def _all_finite(self, value: torch.Tensor) -> bool:
        """True when `value` (a bool tensor) holds on every rank."""
        flag = value.detach().float().reshape(1).cpu()
        if self.world_size > 1:
            import deepspeed.comm as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def train_step(self, micro_batches: list[Batch]) -> StepMetrics:
        """One optimizer update over `grad_accum` micro-batches, then the EMA update."""
        if len(micro_batches) != self.cfg.train.grad_accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches for grad_accum={self.cfg.train.grad_accum}")
        t0 = time.perf_counter()
        self.student.train()
        lr = float(self.scheduler.get_last_lr()[0])
        losses, sums = [], {}
        samples, finite = 0, True
        self._grad_sum = torch.zeros(())
        for micro, batch in enumerate(micro_batches):
            out = self.task(batch.to(self.device, self.dtype), step=self.step, micro=micro)
            # Every rank agrees before backward, so a NaN on one rank skips the update on all.
            finite = finite and self._all_finite(torch.isfinite(out.loss.detach()))
            if finite:
                self.engine.backward(out.loss)
                finite = self._all_finite(torch.isfinite(self._grad_sum))
            if not finite:
                break
            self.engine.step()
            losses.append(float(out.loss.detach()))
            samples += batch.batch_size
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        if not finite:
            return self._skip_update(len(micro_batches), t0, lr)
        self.consecutive_skips = 0
        grad_norm = self.engine.get_global_grad_norm()
        applied = getattr(self.engine, "was_step_applied", lambda: True)()
        if applied:
            tau = self.teacher.update(self.step)
        else:  # fp16 overflow: DeepSpeed skipped the update, so the teacher stays where it is
            tau = float("nan")
        self.step += 1
        n = len(micro_batches)
        values = {k: v / n for k, v in sums.items()}
        values.update(ema_decay=tau, lr=lr, samples=float(samples), step_time=time.perf_counter() - t0,
                      grad_norm=float(grad_norm) if grad_norm is not None else float("nan"))
        return StepMetrics(self.step, sum(losses) / n, values)

    def _skip_update(self, window: int, t0: float, lr: float) -> StepMetrics:
        """Drops the accumulated gradients of a window that produced a NaN/inf, keeps DeepSpeed's
        micro-step count aligned with the window, and leaves weights and teacher untouched."""
        self.engine.zero_grad()
        done = self.engine.micro_steps % self.cfg.train.grad_accum
        if done:
            self.engine.micro_steps += self.cfg.train.grad_accum - done
        self.skipped_steps += 1
        self.consecutive_skips += 1  # the step count does not advance: the next batch retries it
        values = {"skipped": 1.0, "skipped_steps": float(self.skipped_steps), "lr": lr,
                  "step_time": time.perf_counter() - t0, "samples": 0.0}
        return StepMetrics(self.step, float("nan"), values)

    def norms(self) -> tuple[float, float]:
        """L2 norms of the student's fp32 weights and of the teacher's EMA (all ranks call this)."""
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            student = [safe_get_local_fp32_param(p) for p in self.student.parameters() if p.requires_grad]
            sq = [sum(float(t.detach().float().square().sum()) for t in ts if t is not None)
                  for ts in (student, self.teacher.ema_parameters())]
            if self.world_size > 1:
                import deepspeed.comm as dist

                t = torch.tensor(sq, dtype=torch.float64)
                dist.all_reduce(t)
                sq = t.tolist()
        else:
            sq = [sum(float(p.detach().float().square().sum()) for p in ps)
                  for ps in (self.student.parameters(), self.teacher.ema_parameters())]
        return sq[0] ** 0.5, sq[1] ** 0.5

    def fit(self, batches: Iterator[Batch], max_steps: int | None = None) -> list[StepMetrics]:
        """Runs updates until max_steps (default train.max_steps); returns every step's metrics."""
        history = []
        stop = max_steps if max_steps is not None else self.cfg.train.max_steps
        while self.step < stop:
            micro = [next(batches) for _ in range(self.cfg.train.grad_accum)]
            history.append(self.train_step(micro))
        return history
