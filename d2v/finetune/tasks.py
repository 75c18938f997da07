"""What each downstream task reads, batches, optimises and scores (the task is not the loop).

A task is one registered `DownstreamTask` class: its name and modality, its defaults and checks
on the fine-tuning config, what it does to the model before training, and per instance the data
(`size`, `batch(split, indices)` builds one micro-batch), the objective (`loss`) and the scoring
(`score` returns additive counts that ranks sum before `summarize` turns them into metrics).
Nothing outside this module compares task names: adding a task is one class here (or in a module
that registers it) plus its presets and tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config.schema import D2vConfig, OptimConfig, TrainConfig
from d2v.finetune.config import FinetuneConfig
from d2v.finetune.masking import FeatureMasking
from d2v.finetune.model import FinetuneModel, MeanPoolHead, TaskOutput

TASKS: dict[str, type["DownstreamTask"]] = {}
"""Every registered downstream task by name."""


def register(cls: type["DownstreamTask"]) -> type["DownstreamTask"]:
    if cls.name in TASKS:
        raise ValueError(f"two downstream tasks are named {cls.name!r}")
    TASKS[cls.name] = cls
    return cls


def task_class(name: str) -> type["DownstreamTask"]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; use one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


@dataclass
class FtBatch:
    source: Tensor
    """audio B×S waveforms (zero-padded) | image B×3×H×W | text B×T token ids (padded)."""
    source_lengths: Tensor | None = None
    """audio: B valid samples per row."""
    labels: Tensor | None = None
    """classification: B class indices."""
    targets: list[list[int]] | None = None
    """asr: CTC label ids per row."""
    texts: list[str] | None = None
    """asr: reference transcripts."""
    sets: list[str] | None = None
    """asr evaluation: the evaluation set of each row."""


def frames_of(out: TaskOutput) -> Tensor:
    """B valid frames per row from the model's padding mask."""
    B, T = out.logits.shape[:2]
    if out.padding_mask is None:
        return torch.full((B,), T, dtype=torch.long)
    return (~out.padding_mask).sum(dim=1).long().cpu()


class DownstreamTask:
    """One downstream task: class-level facts and config hooks, instance-level data and scoring."""

    name: ClassVar[str]
    modality: ClassVar[str]
    """The encoder modality the task needs."""
    probe: ClassVar[bool] = False
    """A linear probe on pooled features measures the same thing (single-label classification)."""
    score_keys: ClassVar[tuple[str, ...]] = ()
    data_help: ClassVar[str] = ""
    """What --train-data and --eval-data are for this task."""
    num_outputs: int
    labels: list[str]

    @classmethod
    def defaults(cls, optim: OptimConfig, train: TrainConfig) -> None:
        """Adjusts the shared fine-tuning defaults before overrides apply."""

    @classmethod
    def configure(cls, cfg: FinetuneConfig, base: D2vConfig) -> None:
        """Fills settings that come from the pretraining config, before overrides apply."""

    @classmethod
    def check(cls, cfg: FinetuneConfig) -> list[str]:
        """Problems with a resolved config, one line each."""
        return []

    @staticmethod
    def feature_masking(cfg: FinetuneConfig) -> FeatureMasking | None:
        """Masking of the encoder's input features while training (None: none)."""
        return None

    def epoch_plan(self, cfg: FinetuneConfig, rank: int, world_size: int) -> Callable[[int], list[list[int]]] | None:
        """This rank's training batches of an epoch, when the task batches other than by a fixed
        count (None: train.micro_batch_size examples, the loop's rank_batches)."""
        return None

    def head(self, embed_dim: int) -> nn.Module:
        """The task's head: (B×T×D encoder outputs, B×T padding mask or None) -> logits."""
        return MeanPoolHead(embed_dim, self.num_outputs)

    def param_groups(self, model: FinetuneModel, cfg: FinetuneConfig) -> list[dict]:
        """The optimizer's parameter groups (a group may carry its own lr)."""
        from d2v.train.trainer import param_groups

        return param_groups(model, cfg.optim.no_decay_1d, cfg.optim.weight_decay)

    def begin_update(self, step: int) -> None:
        """Called before the batches of each update with its step (0-based): seeds per-update randomness."""

    def prepare_model(self, model: FinetuneModel, cfg: FinetuneConfig) -> None:
        """Changes to the model before the engine is built (freezing parts)."""

    def size(self, split: str) -> int:
        raise NotImplementedError

    def batch(self, split: str, indices: Sequence[int]) -> FtBatch:
        raise NotImplementedError

    def loss(self, out: TaskOutput, batch: FtBatch) -> Tensor:
        raise NotImplementedError

    def score(self, out: TaskOutput, batch: FtBatch) -> dict[str, float]:
        raise NotImplementedError

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError


class ClassificationTask(DownstreamTask):
    """Cross-entropy on one label per example; metric accuracy."""

    probe = True
    score_keys = ("correct", "examples")

    def _hold(self, inputs: dict[str, list | Tensor], labels: dict[str, np.ndarray], names: list[str],
              collate) -> None:
        self.inputs, self.targets, self.labels = inputs, labels, names
        self.num_outputs = len(names)
        self._collate = collate

    def size(self, split: str) -> int:
        return len(self.targets[split])

    def batch(self, split: str, indices: Sequence[int]) -> FtBatch:
        idx = list(indices)
        return FtBatch(self._collate([self.inputs[split][i] for i in idx]),
                       labels=torch.as_tensor(self.targets[split][idx], dtype=torch.long))

    def loss(self, out: TaskOutput, batch: FtBatch) -> Tensor:
        return F.cross_entropy(out.logits.float(), batch.labels.to(out.logits.device))

    def score(self, out: TaskOutput, batch: FtBatch) -> dict[str, float]:
        pred = out.logits.argmax(dim=-1).cpu()
        return {"correct": float((pred == batch.labels).sum()), "examples": float(len(batch.labels))}

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        return {"accuracy": sums["correct"] / max(sums["examples"], 1)}


@register
class TextClassification(ClassificationTask):
    name = "text_cls"
    modality = "text"
    data_help = "TSV file (text<TAB>label)"

    @classmethod
    def defaults(cls, optim: OptimConfig, train: TrainConfig) -> None:
        optim.lr, optim.weight_decay = 3e-4, 0.01
        train.micro_batch_size = 16

    @classmethod
    def configure(cls, cfg: FinetuneConfig, base: D2vConfig) -> None:
        """The pretraining tokenizer: recorded beside the pretraining shards, else the one a
        transformers export ships in the --init directory."""
        import os

        if base.data.train_shards:
            from d2v.data.text import load_tokenizer_meta

            try:
                meta = load_tokenizer_meta(base.data.train_shards)
                cfg.finetune.tokenizer = os.path.join(os.path.dirname(base.data.train_shards.split("{")[0]),
                                                      meta["file"])
                return
            except FileNotFoundError:
                pass  # the pretraining shards are elsewhere
        if cfg.init and os.path.isdir(cfg.init):
            from d2v.interop.hf_export import exported_tokenizer

            found = exported_tokenizer(cfg.init)
            if found:
                cfg.finetune.tokenizer = found

    @classmethod
    def check(cls, cfg: FinetuneConfig) -> list[str]:
        if not cfg.finetune.tokenizer:
            return [f"{cls.name} needs the pretraining tokenizer: --tokenizer FILE (finetune.tokenizer)"]
        return []

    def __init__(self, cfg: FinetuneConfig) -> None:
        from d2v.data.labelled_text import read_tsv

        t = cfg.model.text
        tok = pretraining_tokenizer(cfg)
        train_texts, train_y, names = read_tsv(cfg.finetune.train_data)
        eval_texts, eval_y, _ = read_tsv(cfg.finetune.eval_data, labels=names)

        def encode(texts: list[str]) -> list[list[int]]:
            # <s> text </s>, cut to the position table (RoBERTa's classification input).
            return [[t.bos_id] + tok.encode(s)[:t.max_positions - 2] + [t.eos_id] for s in texts]

        self._hold({"train": encode(train_texts), "eval": encode(eval_texts)},
                   {"train": np.array(train_y), "eval": np.array(eval_y)}, names,
                   lambda rows: pad_tokens(rows, t.pad_id))


def pretraining_tokenizer(cfg: FinetuneConfig):
    """finetune.tokenizer, checked against the encoder's embedding."""
    from d2v.data.tokenizer import Tokenizer

    tok = Tokenizer(cfg.finetune.tokenizer)
    if tok.info.vocab_size != cfg.model.text.vocab_size:
        raise ValueError(f"{cfg.finetune.tokenizer} has {tok.info.vocab_size} entries but the encoder's "
                         f"embedding has {cfg.model.text.vocab_size}: use the tokenizer the model was pretrained with")
    return tok


def pad_tokens(rows: list[list[int]], pad_id: int) -> Tensor:
    """B×T token ids, right-padded."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def build_task(cfg: FinetuneConfig) -> DownstreamTask:
    return task_class(cfg.task)(cfg)

