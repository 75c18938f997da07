"""The data2vec 2.0 task (docs/method.md §3.3): what one micro-batch computes.

student(M clones, kept tokens only) -> decoder -> predictions at the masked positions of all B·M rows
teacher(clean view, once per sample, no grad) -> targets B×T×D, indexed per clone (never recomputed)
loss = Σ L2 × scale over masked positions  (+ cls_loss × count × Σ_rows L2(CLS, mean target), image)
The sum is divided by `normalizer(count)` as in 1.0 (all-reduced count on several ranks). The CLS
term is weighted by the count as the reference does, so after the division it is cls_loss times
the per-row CLS loss summed over rows.
"""
from __future__ import annotations

from torch import Tensor

from d2v.batch import Batch, target_index
from d2v.losses import per_dim_std, regression_loss
from d2v.task import Data2VecTask, StepOutput, layer_seed


def clone_targets(y_BTD: Tensor, mask_BMT: Tensor, padding_mask_BT: Tensor | None,
                  positions_P: Tensor | None = None) -> Tensor:
    """P×D targets at the masked non-padded positions of the B·M rows, in the row-major order of the
    (B·M)×T mask: row r takes sample r // M's targets (indexed, not repeated in memory).
    positions_P: those positions flattened (row·T + t), worked out on the host with the batch."""
    B, M, T = mask_BMT.shape
    if positions_P is None:
        valid = mask_BMT if padding_mask_BT is None else mask_BMT & ~padding_mask_BT.unsqueeze(1)
        rows, cols = valid.reshape(B * M, T).nonzero(as_tuple=True)
    else:
        rows, cols = positions_P // T, positions_P % T
    return y_BTD[rows // M, cols]


def mean_target(y_BTD: Tensor, padding_mask_BT: Tensor | None) -> Tensor:
    """B×D mean of the targets over the real positions (the CLS target)."""
    if padding_mask_BT is None:
        return y_BTD.mean(dim=1)
    valid = (~padding_mask_BT).unsqueeze(-1).to(y_BTD.dtype)
    return (y_BTD * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


class Data2VecV2Task(Data2VecTask):
    """Same construction as the 1.0 task (student, teacher, normalizer, engine forward)."""

    def __call__(self, batch: Batch, *, step: int = 0, micro: int = 0) -> StepOutput:
        if batch.masked_source is not None:
            raise ValueError("2.0 batches carry no masked view (masked tokens are dropped); make them with the "
                             "2.0 collate (model.v2.enabled)")
        index = batch.index
        out = self.forward(batch.source, batch.mask, batch.source_lengths,
                           layer_seed=layer_seed(self.cfg.train.seed, step, micro), index=index)
        padding = out.features.padding_mask
        inputs = batch.source if self.cfg.teacher.input == "source" else out.features.x.detach()
        # Once per original sample: the M clones share these targets.
        y_BTD = self.teacher.targets(inputs, padding, compute_dtype=self.compute_dtype)
        target_PD = clone_targets(y_BTD, batch.mask, padding, None if index is None else index.targets)
        pred_PD = out.prediction
        loss_sum, count = regression_loss(pred_PD, target_PD, self.cfg.loss)
        metrics = {}
        weight_cls = self.cfg.model.v2.cls_loss
        if weight_cls > 0 and out.cls is not None:
            M = batch.mask.shape[1]
            cls_target = mean_target(y_BTD, padding).repeat_interleave(M, dim=0)
            cls_sum, _ = regression_loss(out.cls, cls_target, self.cfg.loss)
            loss_sum = loss_sum + weight_cls * count * cls_sum
            metrics["cls_loss"] = cls_sum.detach() / max(cls_target.shape[0], 1)
        # A filler batch (all samples unreadable) has weight 0: it keeps ranks in step, adds nothing.
        weight = float(batch.extras.get("weight", 1.0))
        if weight != 1.0:
            loss_sum, count = loss_sum * weight, int(count * weight)
        loss = loss_sum / self.normalizer(count)
        if index is None:
            index = target_index(batch.mask.cpu(), None if padding is None else padding.cpu())
        metrics.update({
            "loss_sum": loss_sum.detach(),
            "loss_count": float(count),
            "target_std": per_dim_std(target_PD),
            "pred_std": per_dim_std(pred_PD),
            "mask_rate": index.mask_rate,
        })
        return StepOutput(loss, index.num_targets, metrics)
