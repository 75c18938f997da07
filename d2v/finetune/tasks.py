"""What each fine-tuning task reads, batches, optimises and scores (the task is not
the loop). All three keep their (small) data in memory; `batch(split, indices)` builds one
micro-batch, `loss` the training objective, `score` additive counts that ranks sum before
`summarize` turns them into metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from d2v.finetune.config import FinetuneConfig
from d2v.finetune.ctc import CharVocab, ctc_loss, greedy_decode
from d2v.finetune.metrics import char_errors, word_errors
from d2v.finetune.model import TaskOutput


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


class AsrTask:
    """CTC on characters; metrics WER and CER of greedy decoding."""

    per_frame = True
    score_keys = ("word_errors", "words", "char_errors", "chars")

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


class ClassificationTask:
    """Cross-entropy on one label per example; metric accuracy."""

    per_frame = False
    score_keys = ("correct", "examples")

    def __init__(self, inputs: dict[str, list | Tensor], labels: dict[str, np.ndarray], names: list[str],
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


def image_task(cfg: FinetuneConfig) -> ClassificationTask:
    from d2v.data.imagefolder import read_imagefolder

    im = cfg.model.image
    train_x, train_y, names = read_imagefolder(cfg.finetune.train_data, im.image_size, im.mean, im.std)
    eval_x, eval_y, _ = read_imagefolder(cfg.finetune.eval_data, im.image_size, im.mean, im.std, classes=names)
    return ClassificationTask({"train": train_x, "eval": eval_x}, {"train": train_y, "eval": eval_y}, names,
                              torch.stack)


def text_task(cfg: FinetuneConfig) -> ClassificationTask:
    from d2v.data.labelled_text import read_tsv
    from d2v.data.tokenizer import Tokenizer

    t = cfg.model.text
    tok = Tokenizer(cfg.finetune.tokenizer)
    if tok.info.vocab_size != t.vocab_size:
        raise ValueError(f"{cfg.finetune.tokenizer} has {tok.info.vocab_size} entries but the encoder's embedding "
                         f"has {t.vocab_size}: use the tokenizer the model was pretrained with")
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

    return ClassificationTask({"train": encode(train_texts), "eval": encode(eval_texts)},
                              {"train": np.array(train_y), "eval": np.array(eval_y)}, names, collate)


def build_task(cfg: FinetuneConfig):
    if cfg.task == "asr":
        return AsrTask(cfg)
    if cfg.task == "image_cls":
        return image_task(cfg)
    if cfg.task == "text_cls":
        return text_task(cfg)
    raise ValueError(f"unknown task {cfg.task!r}")
