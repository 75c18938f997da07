"""Image classification (`image_cls`) with the references' fine-tuning recipe (README, fine-tuning).

Data: an ImageFolder tree per split, decoded per batch (d2v.data.image_finetune). Training images go
through the configured crop, flip, RandAugment and random erasing, each example seeded by (seed,
update step, index); then Mixup/CutMix per micro-batch (d2v.finetune.mixup) with smoothed targets.
Evaluation images are resized and centre-cropped. The model: drop path on the blocks, the mean of the
patch outputs (CLS excluded), an optional fresh LayerNorm (fc_norm; the encoder's final norm is then
dropped, as BEiT does under mean pooling) and a linear classifier. The optimizer's groups carry
layer-wise LR decay (d2v.finetune.layer_decay). Scores: top-1 and top-5 correct counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config.schema import OptimConfig, TrainConfig
from d2v.data.image_finetune import EvalTransform, ImageFolderSource, TrainTransform, example_generator
from d2v.data.randaugment import RandAugment
from d2v.finetune.config import FinetuneConfig
from d2v.finetune.image_recipes import recipe_version
from d2v.finetune.layer_decay import layer_decay_groups, set_drop_path
from d2v.finetune.mixup import Mixup, soft_cross_entropy
from d2v.finetune.model import FinetuneModel, MeanPoolHead, TaskOutput, masked_mean
from d2v.finetune.tasks import ClassificationTask, FtBatch, register

TRAIN_CROPS = ("resize", "random_resized")


@dataclass
class ImageBatch(FtBatch):
    soft_targets: Tensor | None = None
    """Training with Mixup/CutMix: B×K mixed, smoothed targets."""


class PooledHead(MeanPoolHead):
    """Mean over the patch outputs, then an optional LayerNorm, then the classifier (weights scaled at init)."""

    def __init__(self, embed_dim: int, num_classes: int, *, fc_norm: bool, init_scale: float) -> None:
        super().__init__(embed_dim, num_classes)
        with torch.no_grad():
            self.weight.mul_(init_scale)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if fc_norm else None

    def forward(self, h_BTD: Tensor, padding_BT: Tensor | None = None) -> Tensor:
        x = masked_mean(h_BTD, padding_BT)
        return F.linear(self.norm(x) if self.norm is not None else x, self.weight, self.bias)


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> int:
    """Examples whose label is among the k highest logits."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return int((top == labels.view(-1, 1)).any(dim=-1).sum())


@register
class ImageClassification(ClassificationTask):
    name = "image_cls"
    modality = "image"
    data_help = "ImageFolder root"
    score_keys = ("correct", "correct5", "examples")

    @classmethod
    def defaults(cls, optim: OptimConfig, train: TrainConfig) -> None:
        optim.lr, optim.weight_decay, optim.no_decay_1d = 1e-3, 0.05, True
        train.micro_batch_size = 32

    @classmethod
    def check(cls, cfg: FinetuneConfig) -> list[str]:
        im, problems = cfg.finetune.image, []
        recipe = cfg.finetune.recipe
        version = 2 if cfg.model.drops_masked else 1
        if recipe and recipe_version(recipe) != version:
            problems.append(f"finetune.recipe={recipe} is data2vec {recipe_version(recipe)}.0's recipe but the model "
                            f"is data2vec {version}.0: pick the recipe of the model's version")
        if not 0 < im.layer_decay <= 1:
            problems.append("finetune.image.layer_decay must be in (0, 1] (1: no decay)")
        if im.drop_path is not None and not 0 <= im.drop_path < 1:
            problems.append("finetune.image.drop_path must be in [0, 1) or null")
        for key in ("mixup_prob", "mixup_switch_prob", "erase_prob"):
            if not 0 <= getattr(im, key) <= 1:
                problems.append(f"finetune.image.{key} must be in [0, 1]")
        if im.mixup < 0 or im.cutmix < 0 or not 0 <= im.label_smoothing < 1:
            problems.append("finetune.image.mixup and cutmix must be >= 0, label_smoothing in [0, 1)")
        if (im.mixup > 0 or im.cutmix > 0) and cfg.train.micro_batch_size % 2:
            problems.append("mixup/cutmix pair each image with the reversed micro-batch: "
                            "make train.micro_batch_size even")
        if im.train_crop not in TRAIN_CROPS:
            problems.append(f"finetune.image.train_crop={im.train_crop!r}: use one of {', '.join(TRAIN_CROPS)}")
        if not 0 < im.crop_pct <= 1:
            problems.append("finetune.image.crop_pct must be in (0, 1]")
        try:
            RandAugment.parse(im.auto_augment)
        except ValueError as err:
            problems.append(str(err))
        return problems

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        m, im = cfg.model.image, cfg.finetune.image
        train = ImageFolderSource(cfg.finetune.train_data)
        self.sources = {"train": train, "eval": ImageFolderSource(cfg.finetune.eval_data, classes=train.classes)}
        self.targets = {split: src.labels for split, src in self.sources.items()}
        self.labels, self.num_outputs = train.classes, len(train.classes)
        mean, std = tuple(m.mean), tuple(m.std)
        scale = (0.08, 1.0) if im.train_crop == "random_resized" else None
        self.train_transform = TrainTransform(m.image_size, mean, std, RandAugment.parse(im.auto_augment),
                                              im.erase_prob, scale)
        self.eval_transform = EvalTransform(m.image_size, mean, std, im.crop_pct)
        self.mixup = Mixup(im.mixup, im.cutmix, im.mixup_prob, im.mixup_switch_prob, im.label_smoothing,
                           self.num_outputs)
        self.seed, self.step = cfg.train.seed, 0

    def head(self, embed_dim: int) -> nn.Module:
        im = self.cfg.finetune.image
        return PooledHead(embed_dim, self.num_outputs, fc_norm=im.fc_norm, init_scale=im.head_init_scale)

    def prepare_model(self, model: FinetuneModel, cfg: FinetuneConfig) -> None:
        im = cfg.finetune.image
        if im.drop_path is not None:
            set_drop_path(model, im.drop_path)
        if im.fc_norm:
            model.backbone.encoder.final_norm = None

    def param_groups(self, model: FinetuneModel, cfg: FinetuneConfig) -> list[dict]:
        im = cfg.finetune.image
        if im.layer_decay == 1.0:
            return super().param_groups(model, cfg)
        return layer_decay_groups(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, decay=im.layer_decay,
                                  embeddings_decay=im.embeddings_decay)

    def begin_update(self, step: int) -> None:
        self.step = step

    def batch(self, split: str, indices: Sequence[int]) -> FtBatch:
        idx = list(indices)
        labels = torch.as_tensor(self.targets[split][idx], dtype=torch.long)
        if split != "train":
            return ImageBatch(self.sources[split].eval_batch(idx, self.eval_transform), labels=labels)
        images = self.sources["train"].train_batch(idx, self.train_transform, self.seed, self.step)
        if not self.mixup.active:
            return ImageBatch(images, labels=labels)
        # One draw per micro-batch; its first index tells the ranks' (disjoint) micro-batches apart.
        images, soft, _ = self.mixup(images, labels, example_generator(self.seed, self.step, -1 - idx[0]))
        return ImageBatch(images, labels=labels, soft_targets=soft)

    def loss(self, out: TaskOutput, batch: FtBatch) -> Tensor:
        logits = out.logits.float()
        soft = getattr(batch, "soft_targets", None)
        if soft is not None:
            return soft_cross_entropy(logits, soft.to(logits.device))
        return F.cross_entropy(logits, batch.labels.to(logits.device),
                               label_smoothing=self.cfg.finetune.image.label_smoothing)

    def score(self, out: TaskOutput, batch: FtBatch) -> dict[str, float]:
        logits = out.logits.float().cpu()
        return {"correct": float(topk_correct(logits, batch.labels, 1)),
                "correct5": float(topk_correct(logits, batch.labels, 5)), "examples": float(len(batch.labels))}

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["examples"], 1)
        return {"accuracy": sums["correct"] / n, "top5": sums["correct5"] / n}
