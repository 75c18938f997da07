"""GLUE fine-tuning (README, fine-tuning), as fairseq's data2vec 2.0 text fine-tuning does it.

* Input: fairseq's sentence_prediction task with init_token 0 and separator_token 2 on the
  preprocessed files (each sentence ends in `</s>`): `<s> A </s>` for one sentence and
  `<s> A </s> </s> B </s>` for a pair, tokenized with the pretraining tokenizer. The reference
  shortens nothing (max_positions 512 holds GLUE's pairs); a longer example is cut to the position
  table from its end (fairseq's `--shorten-method truncate`), counted and reported.
* Head: RoBERTa's classification head on the first token (`<s>`): dropout, dense D->D, tanh,
  dropout, out_proj (data2vec_text_classification registers it with pooler_dropout 0).
* Objective: cross-entropy; STS-B regresses its score divided by 5 (fairseq's preprocessing puts it
  in [0, 1]) with one output and a squared error.
* Metrics (fairseq's sentence_prediction criterion): accuracy for all classification tasks, MCC for
  CoLA, F1 of class 1 and their mean for MRPC and QQP, Pearson's r, Spearman's rho and their mean
  for STS-B; MNLI's matched and mismatched dev sets are scored separately. Scores are sums over
  ranks (d2v.finetune.glue_metrics); STS-B's predictions are also placed in one slot per example,
  so that summing over ranks gathers them for the ranks Spearman's rho needs.
* Recipes `glue_<task>`: the settings of fairseq's `examples/data2vec/config/v2/text_finetuning/<task>.yaml`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v import collectives
from d2v.config.schema import D2vConfig, OptimConfig, TrainConfig
from d2v.data.glue import LAYOUTS, GlueSplit, layout, read_glue
from d2v.finetune import glue_metrics as gm
from d2v.finetune.config import FinetuneConfig
from d2v.finetune.model import TaskOutput
from d2v.finetune.recipes import RECIPES, Recipe
from d2v.finetune.tasks import (DownstreamTask, FtBatch, TextClassification, pad_tokens, pretraining_tokenizer,
                                register)

REGRESSION_SCALE = 5.0
"""STS-B's scores (0-5) are divided by this for training (fairseq's preprocessing)."""

REPORTS = {"cola": "mcc", "mrpc": "f1", "qqp": "f1", "sts_b": "correlation"}
"""What a task reports beyond accuracy (fairseq's report_mcc, report_acc_and_f1, report_pearson_and_spearman)."""


def encode_example(texts: Sequence[str], encode, bos: int, eos: int, max_positions: int) -> tuple[list[int], bool]:
    """(token ids, whether they were cut): `<s> A </s>` or `<s> A </s> </s> B </s>`."""
    ids = [bos] + encode(texts[0]) + [eos]
    for text in texts[1:]:
        ids += [eos] + encode(text) + [eos]
    return ids[:max_positions], len(ids) > max_positions


class SentenceHead(nn.Module):
    """RoBERTa's classification head on the first position: B×T×D -> B×V. Its first dropout is
    the model's dropout on the encoder output (finetune.head_dropout); the same rate follows tanh."""

    def __init__(self, embed_dim: int, num_outputs: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(embed_dim, num_outputs)

    def forward(self, h_BTD: Tensor, padding_BT: Tensor | None = None) -> Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(h_BTD[:, 0]))))


@dataclass
class GlueBatch(FtBatch):
    indices: list[int] | None = None
    """The examples' positions in their split."""
    subsets: Tensor | None = None
    """B indices into the split's files (MNLI: 0 matched, 1 mismatched)."""


@register
class GlueTask(DownstreamTask):
    name = "glue"
    modality = "text"
    data_help = "GLUE task folder (glue_data/RTE) or one of its .tsv files, with finetune.glue_task"
    regression: bool
    score_keys: tuple[str, ...]
    subsets: tuple[str, ...]

    @classmethod
    def defaults(cls, optim: OptimConfig, train: TrainConfig) -> None:
        TextClassification.defaults(optim, train)

    @classmethod
    def configure(cls, cfg: FinetuneConfig, base: D2vConfig) -> None:
        TextClassification.configure(cfg, base)

    @classmethod
    def check(cls, cfg: FinetuneConfig) -> list[str]:
        problems = []
        if cfg.finetune.glue_task not in LAYOUTS:
            problems.append(f"finetune.glue_task={cfg.finetune.glue_task!r}: use one of {', '.join(LAYOUTS)} "
                            f"(or --recipe glue_<task>)")
        if not cfg.finetune.tokenizer:
            problems.append(f"{cls.name} needs the pretraining tokenizer: --tokenizer FILE (finetune.tokenizer)")
        return problems

    def head(self, embed_dim: int) -> nn.Module:
        return SentenceHead(embed_dim, self.num_outputs, self.head_dropout)

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.glue_task = cfg.finetune.glue_task
        lay = layout(self.glue_task)
        t = cfg.model.text
        tok = pretraining_tokenizer(cfg)
        self.regression = lay.labels is None
        self.labels = ["score"] if self.regression else list(lay.labels)
        self.num_outputs = len(self.labels)
        self.head_dropout = cfg.finetune.head_dropout
        splits = {"train": read_glue(cfg.finetune.train_data, self.glue_task, train=True),
                  "eval": read_glue(cfg.finetune.eval_data, self.glue_task, train=False)}
        self.tokens, self.targets, self.subset_of = {}, {}, {}
        report = []
        for split, files in splits.items():
            rows, cut = [], 0
            for f in files:
                for texts in f.sentences:
                    ids, was_cut = encode_example(texts, tok.encode, t.bos_id, t.eos_id, t.max_positions)
                    rows.append(ids)
                    cut += was_cut
                report.append(f.report())
            if cut:
                report.append(f"{split}: {cut} examples longer than model.text.max_positions={t.max_positions} "
                              f"were cut to it")
            self.tokens[split] = rows
            self.targets[split] = np.concatenate([self._targets(f) for f in files])
            self.subset_of[split] = np.concatenate([np.full(len(f.targets), i) for i, f in enumerate(files)])
        self.pad_id = t.pad_id
        self.subsets = self._subset_names(splits["eval"])
        self.score_keys = self._score_keys()
        if collectives.rank() == 0:
            print("\n".join(f"glue {self.glue_task}: {line}" for line in report), file=sys.stderr)

    def _targets(self, split: GlueSplit) -> np.ndarray:
        y = np.asarray(split.targets, dtype=np.float64)
        return y / REGRESSION_SCALE if self.regression else y.astype(np.int64)

    @staticmethod
    def _subset_names(files: list[GlueSplit]) -> tuple[str, ...]:
        """Metric-name suffixes per evaluation file: none for one file, else from the file name
        (dev_matched -> _matched)."""
        if len(files) == 1:
            return ("",)
        return tuple("_" + f.subset.removeprefix("dev_") for f in files)

    def _score_keys(self) -> tuple[str, ...]:
        if self.regression:
            # One slot per evaluation example: summed over ranks, the slots gather the predictions.
            return gm.MOMENTS + tuple(f"pred/{i}" for i in range(self.size("eval")))
        per = ("correct", "examples") + (gm.CONFUSION if self.num_outputs == 2 else ())
        return tuple(f"{k}{s}" for s in self.subsets for k in per)

    def size(self, split: str) -> int:
        return len(self.targets[split])

    def batch(self, split: str, indices: Sequence[int]) -> GlueBatch:
        idx = list(indices)
        y = self.targets[split][idx]
        # float64 scores: the metrics' moments are summed in float64.
        labels = torch.as_tensor(y, dtype=torch.float64 if self.regression else torch.long)
        return GlueBatch(pad_tokens([self.tokens[split][i] for i in idx], self.pad_id), labels=labels, indices=idx,
                         subsets=torch.as_tensor(self.subset_of[split][idx]))

    def loss(self, out: TaskOutput, batch: GlueBatch) -> Tensor:
        labels = batch.labels.to(out.logits.device)
        if self.regression:
            return F.mse_loss(out.logits[:, 0].float(), labels.float())
        return F.cross_entropy(out.logits.float(), labels)

    def score(self, out: TaskOutput, batch: GlueBatch) -> dict[str, float]:
        if self.regression:
            pred = out.logits[:, 0].float().cpu().numpy().astype(np.float64)
            return {**gm.moments(pred, batch.labels.numpy()),
                    **{f"pred/{i}": float(p) for i, p in zip(batch.indices, pred)}}
        pred = out.logits.argmax(dim=-1).cpu().numpy()
        gold = batch.labels.numpy()
        sums = {}
        for s, suffix in enumerate(self.subsets):
            mine = batch.subsets.numpy() == s
            counts = {"correct": float(np.sum(pred[mine] == gold[mine])), "examples": float(mine.sum())}
            if self.num_outputs == 2:
                counts.update(gm.confusion(pred[mine], gold[mine]))
            sums.update({f"{k}{suffix}": v for k, v in counts.items()})
        return sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        report = REPORTS.get(self.glue_task)
        if self.regression:
            pred = [sums[f"pred/{i}"] for i in range(self.size("eval"))]
            r, rho = gm.pearson({k: sums[k] for k in gm.MOMENTS}), gm.spearman(pred, self.targets["eval"])
            return {"pearson": r, "spearman": rho, "pearson_and_spearman": (r + rho) / 2}
        out = {}
        for suffix in self.subsets:
            acc = sums[f"correct{suffix}"] / max(sums[f"examples{suffix}"], 1)
            out[f"accuracy{suffix}"] = acc
            counts = {k: sums.get(f"{k}{suffix}", 0.0) for k in gm.CONFUSION}
            if report == "mcc":
                out[f"mcc{suffix}"] = gm.mcc(counts)
            elif report == "f1":
                f1 = gm.f1(counts)
                out.update({f"f1{suffix}": f1, f"acc_and_f1{suffix}": (acc + f1) / 2})
        return out


# -- recipes ----------------------------------------------------------------------------------------
REFERENCE_COMMIT = "3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99"
REFERENCE = ("https://github.com/facebookresearch/fairseq/blob/" + REFERENCE_COMMIT +
             "/examples/data2vec/config/v2/text_finetuning/{}.yaml")

# task: (dataset.batch_size, optimization.lr, optimization.max_update, lr_scheduler.warmup_updates)
_PER_TASK = {
    "cola": (16, 2e-5, 5336, 320),
    "sst_2": (32, 2e-5, 20935, 1256),
    "mrpc": (16, 2e-5, 2296, 137),
    "qqp": (32, 2e-5, 113272, 28318),
    "sts_b": (16, 4e-5, 3598, 214),
    "mnli": (32, 2e-5, 123873, 7432),
    "qnli": (32, 2e-5, 33112, 1986),
    "rte": (16, 2e-5, 2036, 122),
}

# Not carried over: fp16 (d2v runs bf16 or fp32 from the pretraining config), max_tokens 4400 per
# batch (GLUE's batches of 16-32 pairs stay under it), max_epoch 10 (max_update is the budget), and
# best_checkpoint_metric: fairseq keeps the best of its per-epoch validations, d2v reports the
# evaluation after the last update (finetune.eval_every adds intermediate ones to the log).
for _task, (_batch, _lr, _updates, _warmup) in _PER_TASK.items():
    # Shared by all eight files: Adam (0.9, 0.98), eps 1e-6, weight decay 0.1 on every parameter
    # (plain `adam`, not the composite optimizer that would honour the model's no-decay overrides),
    # no clipping, polynomial_decay to 0, pooler_dropout 0, one GPU (the batch is the global batch).
    if f"glue_{_task}" in RECIPES:
        raise ValueError(f"two fine-tuning recipes are named glue_{_task}")
    RECIPES[f"glue_{_task}"] = Recipe(GlueTask.name, REFERENCE.format(_task), {
        "optim.lr": _lr, "optim.betas": (0.9, 0.98), "optim.eps": 1e-6, "optim.weight_decay": 0.1,
        "optim.no_decay_1d": False, "optim.clip_norm": 0.0, "optim.schedule": "polynomial",
        "optim.warmup_steps": _warmup, "optim.min_lr": 0.0, "train.micro_batch_size": _batch,
        "train.max_steps": _updates, "finetune.glue_task": _task, "finetune.head_dropout": 0.0})
