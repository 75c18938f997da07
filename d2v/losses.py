"""Regression losses at masked positions (docs/method.md §3.1 step 4, §3.2).

Each returns (sum, count): the loss summed over the local masked positions and the number of
units it must be divided by. The division happens once, by the global count (all ranks), in the
task's normaliser (docs/method.md §4, "Loss normalisation"), so the gradient does not depend on how
the batch is split over ranks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from d2v.config.schema import LossConfig


# loss.kind -> per-element loss (the names are CHOICES["loss.kind"])
ELEMENTWISE = {
    "l2": lambda pred, target, beta: (pred - target).square(),
    "smooth_l1": lambda pred, target, beta: F.smooth_l1_loss(pred, target, reduction="none", beta=beta),
}


def elementwise(pred: Tensor, target: Tensor, kind: str, beta: float) -> Tensor:
    """Per-element loss in fp32."""
    return ELEMENTWISE[kind](pred.float(), target.float(), beta)


def regression_loss(pred_ND: Tensor, target_ND: Tensor, cfg: LossConfig) -> tuple[Tensor, int]:
    """pred/target: N×D at the N masked positions. Returns (loss sum, normalising count).

    sum_per_position: Σ_positions Σ_d loss × scale, count = N (audio, text).
    mean: Σ over all elements, count = N·D, no scale (vision 1.0, the reference's mean).
    """
    if pred_ND.shape != target_ND.shape:
        raise ValueError(f"prediction {tuple(pred_ND.shape)} and target {tuple(target_ND.shape)} differ")
    n, d = target_ND.shape
    loss = elementwise(pred_ND, target_ND, cfg.kind, cfg.beta)
    if cfg.reduction == "mean":
        return loss.sum(), n * d
    scale = cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(d)
    return loss.sum() * scale, n


def per_dim_std(x_ND: Tensor) -> Tensor:
    """Mean over dimensions of the std over positions: the collapse guard's statistic. A 0-dim
    tensor on x's device (the loop reads it back with the step's other values, at no extra sync)."""
    if x_ND.shape[0] < 2:
        return torch.full((), float("nan"), device=x_ND.device)
    x = x_ND.detach().float()
    return torch.sqrt(x.var(dim=0) + 1e-6).mean()
