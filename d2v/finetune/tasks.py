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
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config.schema import D2vConfig, OptimConfig, TrainConfig
from d2v.finetune.config import FinetuneConfig
from d2v.finetune.ctc import CharVocab, ctc_loss, greedy_decode
from d2v.finetune.metrics import char_errors, word_errors
from d2v.finetune.model import FinetuneModel, FrameHead, MeanPoolHead, TaskOutput, freeze_feature_encoder

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

    @classmethod
    def apply_recipe(cls, cfg: FinetuneConfig, name: str) -> None:
        """Sets the settings of a named reference recipe (finetune.recipe), before the other overrides."""
        raise ValueError(f"task {cls.name} has no recipes; remove finetune.recipe={name}")

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


@register
class AsrTask(DownstreamTask):
    """CTC on characters; metrics WER and CER of greedy decoding."""

    name = "asr"
    modality = "audio"
    score_keys = ("word_errors", "words", "char_errors", "chars")
    data_help = "transcribed shard pattern"

    def head(self, embed_dim: int) -> nn.Module:
        return FrameHead(embed_dim, self.num_outputs)

    def prepare_model(self, model: FinetuneModel, cfg: FinetuneConfig) -> None:
        if cfg.finetune.freeze_feature_encoder:
            freeze_feature_encoder(model)

    def __init__(self, cfg: FinetuneConfig) -> None:
        from d2v.data.transcribed import read_transcribed

        rate = cfg.model.audio.sample_rate
        self.data = {"train": read_transcribed(cfg.finetune.train_data, sample_rate=rate),
                     "eval": read_transcribed(cfg.finetune.eval_data, sample_rate=rate)}
        self.vocab = CharVocab.from_transcripts(u.text for u in self.data["train"])
        self.labels = self.vocab.symbols
        self.num_outputs = len(self.vocab)
        self.normalize = cfg.finetune.normalize_audio
        self._targets = [self.vocab.encode(u.text) for u in self.data["train"]]

    def size(self, split: str) -> int:
        return len(self.data[split])

    def batch(self, split: str, indices: Sequence[int]) -> FtBatch:
        utts = [self.data[split][i] for i in indices]
        wavs = [u.wav for u in utts]
        if self.normalize:
            wavs = [(w - w.mean()) / (w.std() + 1e-5) for w in wavs]
        lengths = torch.tensor([len(w) for w in wavs], dtype=torch.long)
        source = torch.zeros(len(wavs), int(lengths.max()))
        for row, w in enumerate(wavs):
            source[row, :len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
        targets = [self._targets[i] for i in indices] if split == "train" else None
        return FtBatch(source, lengths, targets=targets, texts=[u.text for u in utts])

    def loss(self, out: TaskOutput, batch: FtBatch) -> Tensor:
        return ctc_loss(out.logits, frames_of(out), batch.targets)

    def hypotheses(self, out: TaskOutput) -> list[str]:
        return greedy_decode(out.logits, frames_of(out), self.vocab)

    def score(self, out: TaskOutput, batch: FtBatch) -> dict[str, float]:
        hyps = self.hypotheses(out)
        w, c = word_errors(batch.texts, hyps), char_errors(batch.texts, hyps)
        return {"word_errors": w.errors, "words": w.total, "char_errors": c.errors, "chars": c.total}

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        return {"wer": sums["word_errors"] / max(sums["words"], 1), "cer": sums["char_errors"] / max(sums["chars"], 1)}


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
        if not base.data.train_shards:
            return
        import os

        from d2v.data.text import load_tokenizer_meta

        try:
            meta = load_tokenizer_meta(base.data.train_shards)
            cfg.finetune.tokenizer = os.path.join(os.path.dirname(base.data.train_shards.split("{")[0]), meta["file"])
        except FileNotFoundError:
            pass  # the pretraining shards are elsewhere: finetune.tokenizer must be given

    @classmethod
    def check(cls, cfg: FinetuneConfig) -> list[str]:
        if not cfg.finetune.tokenizer:
            return [f"{cls.name} needs the pretraining tokenizer: --tokenizer FILE (finetune.tokenizer)"]
        return []

    def __init__(self, cfg: FinetuneConfig) -> None:
        from d2v.data.labelled_text import read_tsv
        from d2v.data.tokenizer import Tokenizer

        t = cfg.model.text
        tok = Tokenizer(cfg.finetune.tokenizer)
        if tok.info.vocab_size != t.vocab_size:
            raise ValueError(f"{cfg.finetune.tokenizer} has {tok.info.vocab_size} entries but the encoder's "
                             f"embedding has {t.vocab_size}: use the tokenizer the model was pretrained with")
        train_texts, train_y, names = read_tsv(cfg.finetune.train_data)
        eval_texts, eval_y, _ = read_tsv(cfg.finetune.eval_data, labels=names)

        def encode(texts: list[str]) -> list[list[int]]:
            # <s> text </s>, cut to the position table (RoBERTa's classification input).
            return [[t.bos_id] + tok.encode(s)[:t.max_positions - 2] + [t.eos_id] for s in texts]

        def collate(rows: list[list[int]]) -> Tensor:
            out = torch.full((len(rows), max(len(r) for r in rows)), t.pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                out[i, :len(r)] = torch.tensor(r)
            return out

        self._hold({"train": encode(train_texts), "eval": encode(eval_texts)},
                   {"train": np.array(train_y), "eval": np.array(eval_y)}, names, collate)


def build_task(cfg: FinetuneConfig) -> DownstreamTask:
    return task_class(cfg.task)(cfg)

