"""The modality-independent Transformer encoder: positions, input norm, blocks, final norm.

Legend: B batch, T sequence, D width, L blocks.
LayerDrop decisions come from a generator seeded by the caller (the step), so every rank of a
ZeRO-3 job drops the same blocks (docs/method.md §4). A `tap(index, BlockOutput)` callback sees each
block's output as it is produced: the teacher builds its targets from it in a streaming way.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from d2v.models.blocks import BlockOutput

Tap = Callable[[int, BlockOutput], None]


def layerdrop_kept(num_blocks: int, layerdrop: float, layer_seed: int | None) -> list[int]:
    """Indices of the blocks LayerDrop keeps: one draw per block from a generator seeded by the
    caller, so every rank drops the same blocks."""
    if layerdrop == 0.0:
        return list(range(num_blocks))
    gen = torch.Generator().manual_seed(layer_seed) if layer_seed is not None else None
    draws = torch.rand(num_blocks, generator=gen)
    return [i for i in range(num_blocks) if draws[i] >= layerdrop]


def enter_blocks(x_BTD: Tensor, padding_mask_BT: Tensor | None, cls_token: nn.Module | None,
                 layer_norm: nn.Module | None, dropout: nn.Module) -> tuple[Tensor, Tensor | None]:
    """What comes between positions and the first block: the CLS token (never padded), the input
    LayerNorm, dropout."""
    if cls_token is not None:
        x_BTD = cls_token(x_BTD)
        if padding_mask_BT is not None:
            padding_mask_BT = torch.cat([padding_mask_BT.new_zeros(x_BTD.shape[0], 1), padding_mask_BT], dim=1)
    if layer_norm is not None:
        x_BTD = layer_norm(x_BTD)
    return dropout(x_BTD), padding_mask_BT


class ClsToken(nn.Module):
    """Prepends a learned token. A module of its own (not a bare parameter of the encoder) so that
    ZeRO-3 gathers it around its own forward and backward."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, dim).normal_(std=0.02))

    def forward(self, x_BTD: Tensor) -> Tensor:
        return torch.cat([self.weight.expand(x_BTD.shape[0], -1, -1).to(x_BTD.dtype), x_BTD], dim=1)


class TransformerEncoder(nn.Module):
    def __init__(self, blocks: list[nn.Module], *, pos_conv: nn.Module | None = None,
                 layer_norm: nn.Module | None = None, final_norm: nn.Module | None = None,
                 dropout: float = 0.0, layerdrop: float = 0.0, cls_token: bool = False,
                 rel_pos_bias: nn.Module | None = None) -> None:
        super().__init__()
        dim = blocks[0].attention.q_proj.in_features
        self.pos_conv = pos_conv
        # A learned token prepended after masking (vision); outputs and taps exclude it.
        self.cls_token = ClsToken(dim) if cls_token else None
        self.rel_pos_bias = rel_pos_bias
        self.layer_norm = layer_norm
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.layerdrop = layerdrop
        # Recompute each block in backward instead of storing its activations (set by the trainer).
        self.checkpoint_blocks = False

    def streaming_units(self) -> list[nn.Module]:
        """The modules holding parameters, in the order `forward` calls them (the offloaded teacher
        streams one at a time)."""
        return [m for m in (self.pos_conv, self.cls_token, self.layer_norm, self.rel_pos_bias, *self.blocks,
                            self.final_norm) if m is not None]

    def kept_blocks(self, layer_seed: int | None) -> list[int]:
        """Indices of blocks run in this forward (all of them outside training)."""
        return layerdrop_kept(len(self.blocks), self.layerdrop if self.training else 0.0, layer_seed)

    def forward(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None, *,
                layer_seed: int | None = None, tap: Tap | None = None) -> Tensor:
        """Returns B×(E+T)×D with the E extra tokens (CLS) first; taps see only the T positions."""
        if self.pos_conv is not None:
            x_BTD = x_BTD + self.pos_conv(x_BTD, padding_mask_BT)
        extra = self.num_extra_tokens
        x_BTD, padding_mask_BT = enter_blocks(x_BTD, padding_mask_BT, self.cls_token, self.layer_norm, self.dropout)
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for i in self.kept_blocks(layer_seed):
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                out = checkpoint(self.blocks[i], x_BTD, padding_mask_BT, bias, use_reentrant=False)
            else:
                out = self.blocks[i](x_BTD, padding_mask_BT, bias)
            if tap is not None:
                tap(i, out if extra == 0 else BlockOutput(out.x[:, extra:], out.ffn[:, extra:]))
            x_BTD = out.x
        if self.final_norm is not None:
            x_BTD = self.final_norm(x_BTD)
        return x_BTD

    @property
    def num_extra_tokens(self) -> int:
        return 0 if self.cls_token is None else 1
