"""Masking of the features while fine-tuning (wav2vec 2.0 / data2vec speech recipes; fairseq's
`apply_mask` with mask_channel_before false): spans of frames replaced by the pretrained mask
embedding, then spans of feature channels zeroed at every frame. Both are drawn as data2vec's
`compute_mask_indices` draws them (static span lengths, overlaps merged, every row of the batch
cut to the same count): time spans with at least one per row, channel spans with none required.
Training only; evaluation sees the features unmasked.

Legend: B batch, T frames, D feature channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from d2v.masking.span import span_mask


@dataclass(frozen=True)
class FeatureMasking:
    mask_prob: float = 0.0
    mask_length: int = 10
    channel_prob: float = 0.0
    channel_length: int = 64

    @property
    def time(self) -> bool:
        return self.mask_prob > 0

    @property
    def active(self) -> bool:
        return self.mask_prob > 0 or self.channel_prob > 0

    def draw(self, batch: int, frames: int, channels: int, padding_BT: Tensor | None,
             generator: torch.Generator) -> tuple[Tensor | None, Tensor | None]:
        """(B×T time mask or None, B×D channel mask or None), True = masked; padding is never masked."""
        time = channel = None
        if self.mask_prob > 0:
            time = span_mask(batch, frames, mask_prob=self.mask_prob, mask_length=self.mask_length, min_masks=1,
                             padding_mask=None if padding_BT is None else padding_BT.cpu(), generator=generator)
        if self.channel_prob > 0:
            channel = span_mask(batch, channels, mask_prob=self.channel_prob, mask_length=self.channel_length,
                                min_masks=0, generator=generator)
        return time, channel


def check_masking(mask_prob: float, mask_length: int, channel_prob: float, channel_length: int) -> list[str]:
    problems = []
    if not (0 <= mask_prob <= 1 and 0 <= channel_prob <= 1):
        problems.append("finetune.mask_prob and finetune.mask_channel_prob must be in [0, 1]")
    if mask_length < 1 or channel_length < 1:
        problems.append("finetune.mask_length and finetune.mask_channel_length must be >= 1")
    return problems
