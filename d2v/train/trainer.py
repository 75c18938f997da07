"""Pretraining on the one trainer (d2v.train.stepper): the engine, the teacher and the data2vec
task of a run, and the pretraining unit the stepper runs (staging, step, EMA, evaluation sums).

Everything a batch computes lives in `d2v.task`; checkpoints, logging sinks and the data
pipeline are composed around this class by the launcher.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from d2v.batch import Batch
from d2v.config.schema import D2vConfig
from d2v.models import Data2Vec, build_model
from d2v.task import Data2VecTask
from d2v.teacher import Teacher
from d2v import collectives
from d2v.train import distributed, host_sync
from d2v.train.stepper import Stepper
from d2v.train.attention_plan import plan_for_run
from d2v.train.engine import start_engine
from d2v.train.throughput_log import StepFlops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def param_group_names(model: torch.nn.Module, no_decay_1d: bool) -> list[list[str]]:
    """Names of the optimizer's parameter groups, in order: one group, or two with the exempt ones
    second: biases and other 1-D parameters (when no_decay_1d) and parameters the model factory
    marked (BEiT's CLS token). Export relies on this order too."""
    from d2v.models.init import NO_WEIGHT_DECAY

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


def host_padding(batch: Batch, frontend: torch.nn.Module) -> Batch:
    """The frame-level padding mask of a waveform batch that gives lengths but no mask."""
    num_frames = getattr(frontend, "num_frames", None)
    if batch.padding_mask is not None or batch.source_lengths is None or num_frames is None:
        return batch
    lengths = batch.source_lengths.tolist()
    S = batch.source.shape[1]
    if all(n >= S for n in lengths):
        return batch
    frames = torch.tensor([num_frames(n) for n in lengths])
    return replace(batch, padding_mask=torch.arange(num_frames(S))[None, :] >= frames[:, None])


def compile_blocks(encoder: torch.nn.Module) -> None:
    """torch.compile each block's forward only: module hooks (DeepSpeed's) stay outside the graph."""
    for block in encoder.blocks:
        block.forward = torch.compile(block.forward)


class PretrainingUnit:
    """The data2vec task as a unit of the one trainer (d2v.train.stepper): its micro-batch is a
    `Batch` of the pretraining stream, its step the student against the teacher's targets, its
    work after an update the EMA, its evaluation the regression loss summed over targets."""

    score_keys = ("loss_count", "loss_sum")

    def __init__(self, student: Data2Vec, teacher: Teacher, task: Data2VecTask, cfg: D2vConfig,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.student, self.teacher, self.task, self.device, self.dtype = student, teacher, task, device, dtype
        self.step_flops = StepFlops(cfg)
        self._flops = 0.0

    def begin_update(self, step: int) -> None:
        self._flops = 0.0

    def stage(self, batch: Batch) -> Batch:
        """Host work on a micro-batch, then its move to the device: the input checked, the padding
        and target positions worked out from the host copy, the copy itself non-blocking (from
        pinned memory on a GPU). Nothing in the step after this reads the batch back."""
        with host_sync.host_work():
            check = getattr(self.student.frontend, "check_input", None)
            if check is not None:
                check(batch.source if batch.masked_source is None else batch.masked_source)
            batch = host_padding(batch, self.student.frontend).with_index(drops_masked=self.student.drops_masked)
            if self.device.type == "cuda":
                batch = batch.pin_memory()
        return batch.to(self.device, self.dtype)

    @staticmethod
    def has_data(batches: list[Batch]) -> bool:
        # Filler batches (weight 0) stand in for unreadable data; an update where every rank had
        # only fillers has nothing to learn from (weight decay and Adam's moments would still move).
        return any(float(b.extras.get("weight", 1.0)) > 0 for b in batches)

    def micro_step(self, batch: Batch, *, step: int, micro: int):
        out = self.task(batch, step=step, micro=micro)
        # LayerDrop decides how many blocks ran: counted after the forward
        self._flops += self.step_flops(batch.source, blocks_run=self.student.encoder.blocks_run)
        return out.loss, out.metrics

    def after_update(self, step: int, applied: bool) -> dict[str, float]:
        # fp16 overflow: DeepSpeed skipped the update, so the teacher stays where it is
        return {"ema_decay": self.teacher.update(step) if applied else float("nan")}

    def step_values(self, batches: list[Batch], staged: list[Batch]) -> dict[str, float]:
        return {"samples": float(sum(b.batch_size for b in batches)),
                "positions": float(sum(b.index.positions for b in staged)), "flops": float(self._flops)}

    def eval_sums(self, batch: Batch, step: int) -> dict[str, float | torch.Tensor]:
        out = self.task(self.stage(batch), step=step)
        return {"loss_sum": out.metrics["loss_sum"].double(), "loss_count": out.metrics["loss_count"]}

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / sums["loss_count"], "targets": sums["loss_count"]}


class Trainer(Stepper):
    """The one trainer (d2v.train.stepper) set up for pretraining: the DeepSpeed engine, the
    teacher and the data2vec task of one run."""

    def __init__(self, cfg: D2vConfig, ds_template: dict[str, Any], *, student: Data2Vec | None = None) -> None:
        self.cfg = cfg
        self.rank, self.world_size = distributed.init_distributed()
        device = distributed.device()
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
        teacher = Teacher(student, cfg.teacher).place(device)
        parts = start_engine(student, cfg, ds_template, self.world_size,
                             param_groups(student, cfg.optim.no_decay_1d, cfg.optim.weight_decay))
        self.optimizer = parts.optimizer
        self.ds_config, self.zero_stage, self.optimizer_name = parts.ds_config, parts.zero_stage, parts.optimizer_name
        self.student: Data2Vec = parts.engine.module
        if self.zero_stage == 3:
            teacher.attach_zero3(self.student, self.ds_config)
        else:
            teacher.bind(self.student)
        if cfg.train.compile:
            if self.zero_stage == 3:
                raise ValueError("train.compile=true does not work with ZeRO stage 3 (its hooks gather and release "
                                 "parameters around each block); use stage 1 or 2, or train.compile=false")
            compile_blocks(self.student.encoder)
            compile_blocks(teacher.model.encoder)
        self.dtype = DTYPES[cfg.train.precision]
        # every rank, before the first step: outside activation checkpointing and compile
        self.attention_plan = plan_for_run(cfg, device, self.dtype)
        task = Data2VecTask(self.student, teacher, cfg, normalizer=collectives.count_normalizer(),
                            compute_dtype=self.dtype, forward=parts.engine)
        unit = PretrainingUnit(self.student, teacher, task, cfg, device, self.dtype)
        super().__init__(parts.engine, parts.scheduler, unit, self.student, cfg.train.grad_accum, device)

    @property
    def task(self) -> Data2VecTask:
        return self.unit.task

    @task.setter
    def task(self, task: Data2VecTask) -> None:
        self.unit.task = task

    def grad_norm(self) -> float:
        """The last update's global gradient norm (read at log steps: it may wait for the device)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def norms(self) -> tuple[float, float]:
        """L2 norms of the student's fp32 weights and of the teacher's EMA (all ranks call this),
        read back once."""
        if self.zero_stage == 3:
            from d2v.teacher.zero3 import local_fp32_masters

            student = local_fp32_masters([p for p in self.student.parameters() if p.requires_grad])
            sq = torch.stack([square_sum(student, self.device), square_sum(self.teacher.ema_parameters(), self.device)])
            collectives.all_reduce_(sq)
        else:
            sq = torch.stack([square_sum(self.student.parameters(), self.device),
                              square_sum(self.teacher.ema_parameters(), self.device)])
        student_sq, ema_sq = sq.tolist()
        return student_sq ** 0.5, ema_sq ** 0.5


def square_sum(tensors, device: torch.device) -> torch.Tensor:
    """Σ ‖t‖² in float64 on `device`, each tensor reduced where it lives: one multi-tensor norm per
    device and one copy of its scalar, so that host-resident weights (an offloaded teacher, offloaded
    masters) cost one transfer, not one blocking copy per tensor."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            by_device.setdefault(t.device, []).append(t.detach())
    total = torch.zeros((), dtype=torch.float64, device=device)
    for ts in by_device.values():
        norms = torch._foreach_norm(ts, 2, dtype=torch.float32)
        total = total + torch.stack(norms).double().square().sum().to(device)
    return total
