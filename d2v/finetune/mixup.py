"""Mixup, CutMix and label smoothing as the image fine-tuning references apply them (timm's `Mixup`
in "batch" mode, called by data2vec_vision's BEiT fine-tuning and fairseq's
`mae_image_classification.py`), and the soft-target cross-entropy they train with.

Per micro-batch: with probability `prob` the batch is mixed, else left as it is (lam = 1). When both
alphas are positive, CutMix is chosen with probability `switch_prob`, else Mixup. Mixup draws
lam ~ Beta(a, a) and blends each image with the batch's reversed order: x·lam + x.flip(0)·(1 - lam).
CutMix draws lam ~ Beta(a, a), cuts a box of int(H·sqrt(1 - lam)) × int(W·sqrt(1 - lam)) centred at a
uniform pixel (clipped to the image), pastes the reversed batch there, and sets lam to the share of
the image left uncut. Targets: the smoothed one-hot of the label (s/K off, 1 - s + s/K on) mixed with
that of the reversed batch by the same lam.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off).scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pasted box for a drawn lam."""
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (), generator=g))
    cx = int(torch.randint(0, width, (), generator=g))
    clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return (clip(cy - cut_h // 2, height), clip(cy + cut_h // 2, height),
            clip(cx - cut_w // 2, width), clip(cx + cut_w // 2, width))


def _beta(alpha: float, g: torch.Generator) -> float:
    # torch's Beta sampler takes no generator: numpy's, seeded from the caller's.
    return float(np.random.default_rng(int(torch.randint(0, 2**62, (), generator=g))).beta(alpha, alpha))


@dataclass(frozen=True)
class Mixup:
    mixup_alpha: float
    cutmix_alpha: float
    prob: float
    switch_prob: float
    smoothing: float
    num_classes: int

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def draw(self, g: torch.Generator) -> tuple[float, bool]:
        """(lam, use_cutmix) for one batch."""
        if not self.active or torch.rand((), generator=g).item() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = torch.rand((), generator=g).item() < self.switch_prob
        else:
            cutmix = self.cutmix_alpha > 0
        return _beta(self.cutmix_alpha if cutmix else self.mixup_alpha, g), cutmix

    def __call__(self, images: Tensor, labels: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, float]:
        """(mixed B×C×H×W images, B×K soft targets, the lam the targets use)."""
        if self.active and len(images) % 2:
            raise ValueError(f"mixup/cutmix pairs each image with the reversed batch and needs an even micro-batch, "
                             f"got {len(images)}: make train.micro_batch_size even")
        lam, cutmix = self.draw(g)
        if lam < 1.0:
            if cutmix:
                top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam, g)
                images = images.clone()
                images[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
                lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
            else:
                images = images * lam + images.flip(0) * (1.0 - lam)
        targets = smooth_one_hot(labels, self.num_classes, self.smoothing)
        return images, targets * lam + targets.flip(0) * (1.0 - lam), lam


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -sum_k t_k log softmax(z)_k (timm's SoftTargetCrossEntropy)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()
