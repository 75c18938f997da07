"""The data2vec task of 1.0 and 2.0: what one micro-batch computes, and nothing about the loop.

student(masked view; 2.0: M clones, kept tokens only) -> predictions at the masked positions
teacher(clean view, once per sample, no grad) -> targets B×T×D, indexed per clone (never recomputed)
loss = Σ regression loss over masked positions (+ cls_loss × count × Σ_rows L2(CLS, mean target))
The loss is `sum / normalizer(count)`: one process divides by its own count; the training loop
passes a normaliser that all-reduces the count over ranks and multiplies by the world size, so
DeepSpeed's gradient averaging yields the one-process gradient of sum/N (docs/method.md §4). The
CLS term (image 2.0) is weighted by the count as the reference does, so after the division it is
cls_loss times the per-row CLS loss summed over rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from d2v.batch import Batch, as_clone_masks, target_index
from d2v.config.schema import D2vConfig
from d2v.losses import per_dim_std, regression_loss
from d2v.models.audio import Known
from d2v.models.data2vec import Data2Vec, StudentOutput
from d2v.teacher import Teacher

Normalizer = Callable[[int], "float | Tensor"]


@dataclass
class StepOutput:
    loss: Tensor
    """Scalar loss to back-propagate (already normalised)."""
    num_targets: int
    """Masked positions regressed in this micro-batch on this rank."""
    metrics: dict[str, float | Tensor] = field(default_factory=dict)
    """target_std, pred_std, mask_rate, loss_sum, ... (local to this rank). Values computed on
    the device stay 0-dim device tensors, so that the loop reads them back once per step."""


def layer_seed(seed: int, step: int, micro: int = 0) -> int:
    """LayerDrop seed of one forward: identical on every rank (ZeRO-3 gathers the same blocks
    everywhere), different for every update and every accumulated micro-batch of it, as fairseq
    draws LayerDrop per forward. torch's CPU generator keeps only a seed's low 32 bits, so the
    micro index enters through an odd 32-bit multiplier: no two (update, micro) pairs collide for
    up to 256 micro-batches and 8 M updates. Micro-batch 0 keeps the seed of the update alone."""
    return (seed * 1_000_003 + step + micro * 0x9E3779B1) % (2**62)


def clone_targets(y_BTD: Tensor, mask: Tensor, padding_mask_BT: Tensor | None,
                  positions_P: Tensor | None = None) -> Tensor:
    """P×D targets at the masked non-padded positions of the B·M rows, in the row-major order of the
    (B·M)×T mask (a B×T mask is M = 1): row r takes sample r // M's targets (indexed, not repeated
    in memory). positions_P: those positions flattened (row·T + t), worked out on the host."""
    mask_BMT = as_clone_masks(mask)
    B, M, T = mask_BMT.shape
    if positions_P is None:
        valid = mask_BMT if padding_mask_BT is None else mask_BMT & ~padding_mask_BT.unsqueeze(1)
        rows, cols = valid.reshape(B * M, T).nonzero(as_tuple=True)
    elif M == 1:
        return y_BTD.flatten(0, 1).index_select(0, positions_P)
    else:
        rows, cols = positions_P // T, positions_P % T
    return y_BTD[rows // M, cols]


def mean_target(y_BTD: Tensor, padding_mask_BT: Tensor | None) -> Tensor:
    """B×D mean of the targets over the real positions (the CLS target)."""
    if padding_mask_BT is None:
        return y_BTD.mean(dim=1)
    valid = (~padding_mask_BT).unsqueeze(-1).to(y_BTD.dtype)
    return (y_BTD * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


class Data2VecTask:
    def __init__(self, student: Data2Vec, teacher: Teacher, cfg: D2vConfig,
                 normalizer: Normalizer | None = None, compute_dtype: torch.dtype | None = None,
                 forward: Callable[..., StudentOutput] | None = None) -> None:
        """forward: what runs the student (the DeepSpeed engine, whose forward keeps ZeRO's
        gradient-accumulation bookkeeping; calling the bare module loses gradients under ZeRO-3
        with accumulation). Defaults to the student module itself."""
        self.student = student
        self.forward = forward if forward is not None else student
        self.teacher = teacher
        self.cfg = cfg
        self.normalizer: Normalizer = normalizer or (lambda count: float(max(count, 1)))
        self.compute_dtype = compute_dtype

    def __call__(self, batch: Batch, *, step: int = 0, micro: int = 0) -> StepOutput:
        token_view = batch.masked_source is not None
        index = batch.index
        out = self.forward(batch.source, batch.mask, batch.source_lengths, masked_source=batch.masked_source,
                           layer_seed=layer_seed(self.cfg.train.seed, step, micro), index=index)
        padding = out.features.padding_mask
        # Once per original sample: 2.0's M clones share these targets.
        y_BTD = self.teacher.targets(self._teacher_input(batch, out.features.x, token_view), padding,
                                     compute_dtype=self.compute_dtype)
        pred_PD = out.prediction
        target_PD = clone_targets(y_BTD, batch.mask, padding, None if index is None else index.targets)
        loss_sum, count = regression_loss(pred_PD, target_PD, self.cfg.loss)
        metrics = {}
        weight_cls = self.cfg.model.v2.cls_loss
        if weight_cls > 0 and out.cls is not None:
            M = batch.mask.shape[1]
            cls_target = mean_target(y_BTD, padding).repeat_interleave(M, dim=0)
            cls_sum, _ = regression_loss(out.cls, cls_target, self.cfg.loss)
            loss_sum = loss_sum + weight_cls * count * cls_sum
            metrics["cls_loss"] = cls_sum.detach() / max(cls_target.shape[0], 1)
        # A filler batch (a planned batch whose samples were all unreadable) has weight 0: it
        # keeps the ranks in step but contributes nothing.
        weight = float(batch.extras.get("weight", 1.0))
        if weight != 1.0:
            loss_sum, count = loss_sum * weight, int(count * weight)
        loss = loss_sum / self.normalizer(count)
        if index is None:  # outside training: read back from the device once
            index = target_index(batch.mask.cpu(), None if padding is None else padding.cpu(),
                                 drops_masked=self.student.drops_masked)
        metrics.update({
            "loss_sum": loss_sum.detach(),
            "loss_count": float(count),
            "target_std": per_dim_std(target_PD),
            "pred_std": per_dim_std(pred_PD),
            "mask_rate": index.mask_rate,
        })
        return StepOutput(loss, index.num_targets, metrics)

    def _teacher_input(self, batch: Batch, student_features: Tensor, token_view: bool) -> Tensor:
        """The clean view: the student's features (detached, before dropout and masking), the
        student's embedding of the clean tokens (1.0 text masks tokens), or the raw source for a
        teacher with its own feature encoder."""
        if self.cfg.teacher.input == "source":
            return batch.source
        if not token_view:
            return student_features.detach()
        with torch.no_grad():
            known = None if batch.index is None else Known(batch.index.padding_mask)
            return self.student.features(batch.source, batch.source_lengths, known).x
