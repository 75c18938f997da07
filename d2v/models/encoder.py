"""The modality-independent Transformer encoder: positions, input norm, blocks, final norm.

Legend: B batch, T sequence, D width, L blocks.
LayerDrop decisions come from a generator seeded by the caller (the step), so every rank of a
ZeRO-3 job drops the same blocks (DESIGN.md 4). A `tap(index, BlockOutput)` callback sees each
block's output as it is produced: the teacher builds its targets from it in a streaming way.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from d2v.models.blocks import BlockOutput

Tap = Callable[[int, BlockOutput], None]


class TransformerEncoder(nn.Module):
    def __init__(self, blocks: list[nn.Module], *, pos_conv: nn.Module | None = None,
                 layer_norm: nn.Module | None = None, final_norm: nn.Module | None = None,
                 dropout: float = 0.0, layerdrop: float = 0.0) -> None:
        super().__init__()
        self.pos_conv = pos_conv
        self.layer_norm = layer_norm
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.layerdrop = layerdrop

    def kept_blocks(self, layer_seed: int | None) -> list[int]:
        """Indices of blocks run in this forward (all of them outside training)."""
        n = len(self.blocks)
        if not self.training or self.layerdrop == 0.0:
            return list(range(n))
        gen = torch.Generator().manual_seed(layer_seed) if layer_seed is not None else None
        draws = torch.rand(n, generator=gen)
        return [i for i in range(n) if draws[i] >= self.layerdrop]

    def forward(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None, *,
                layer_seed: int | None = None, tap: Tap | None = None) -> Tensor:
        if self.pos_conv is not None:
            x_BTD = x_BTD + self.pos_conv(x_BTD, padding_mask_BT)
        if self.layer_norm is not None:
            x_BTD = self.layer_norm(x_BTD)
        x_BTD = self.dropout(x_BTD)
        for i in self.kept_blocks(layer_seed):
            out = self.blocks[i](x_BTD, padding_mask_BT)
            if tap is not None:
                tap(i, out)
            x_BTD = out.x
        if self.final_norm is not None:
            x_BTD = self.final_norm(x_BTD)
        return x_BTD
