"""A downstream task as a unit of the one trainer (d2v.train.stepper).

Its micro-batch is a list of training indices that the task turns into a batch (`FtBatch`), its
step the task's loss on the fine-tuning model's output, its evaluation the task's additive scores.
Per update it sets what fine-tuning schedules by step: the backbone frozen for the first
`finetune.freeze_encoder_steps` updates, the LayerDrop and feature-masking seed, and the task's own
per-update randomness (image augmentation, mixup).
"""
from __future__ import annotations

from typing import Sequence

import torch

from d2v.finetune.config import FinetuneConfig
from d2v.finetune.model import FinetuneModel, TaskOutput
from d2v.finetune.tasks import DownstreamTask, FtBatch
from d2v.task import layer_seed


class DownstreamUnit:
    teacher = None  # checkpoints hold the engine only

    def __init__(self, task: DownstreamTask, engine, cfg: FinetuneConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.task, self.engine, self.cfg, self.device, self.dtype = task, engine, cfg, device, dtype
        self.model: FinetuneModel = engine.module

    @property
    def score_keys(self) -> tuple[str, ...]:
        return self.task.score_keys

    def forward(self, batch: FtBatch) -> TaskOutput:
        source = batch.source.to(self.device)
        if source.is_floating_point():
            source = source.to(self.dtype)
        lengths = batch.source_lengths.to(self.device) if batch.source_lengths is not None else None
        return self.engine(source, lengths)

    def begin_update(self, step: int) -> None:
        self.model.freeze_backbone = step < self.cfg.finetune.freeze_encoder_steps
        self.model.step_seed = layer_seed(self.cfg.train.seed, step)  # LayerDrop as pretraining draws it
        self.task.begin_update(step)

    def stage(self, indices: list[int]) -> FtBatch:
        return self.task.batch("train", indices)

    @staticmethod
    def has_data(items: Sequence[list[int]]) -> bool:
        return True  # examples are held in memory: nothing unreadable reaches a batch

    def micro_step(self, batch: FtBatch, *, step: int, micro: int):
        return self.task.loss(self.forward(batch), batch), {}

    @staticmethod
    def after_update(step: int, applied: bool) -> dict[str, float]:
        return {}

    @staticmethod
    def step_values(items: Sequence[list[int]], staged: Sequence[FtBatch]) -> dict[str, float]:
        return {"samples": float(sum(len(i) for i in items))}

    def eval_sums(self, indices: list[int], step: int) -> dict[str, float]:
        batch = self.task.batch("eval", indices)
        return self.task.score(self.forward(batch), batch)

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        return self.task.summarize(sums)


__all__ = ["DownstreamUnit"]
