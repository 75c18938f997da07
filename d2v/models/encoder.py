"""The modality-independent Transformer encoder of 1.0 and 2.0 (docs/method.md §3): positions, input
norm, prenet and main blocks, final norm; the full sequence or the kept tokens only.

Legend: B batch (the 2.0 student's B is B·M clones), T sequence, K kept tokens per row, D width,
E extra tokens (CLS), L blocks.
Positions are added before dropping: audio's conv positional encoder runs over the full sequence
with the masked frames zeroed and is gathered at the kept positions; image 2.0 adds a fixed 2-D
sin-cos table. ALiBi uses the original positions of the kept tokens, so distances stay those of
the full sequence.
LayerDrop decisions come from a generator seeded by the caller (the step), so every rank of a
ZeRO-3 job drops the same blocks (docs/method.md §4). A `tap(index, BlockOutput)` callback sees each
block's output as it is produced: the teacher builds its targets from it in a streaming way.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from d2v.batch import kept_positions
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


def gather_rows(x_BT_: Tensor, idx_BK: Tensor) -> Tensor:
    """x[b, idx[b, k]] for B×T or B×T×D tensors."""
    if x_BT_.dim() == 2:
        return torch.gather(x_BT_, 1, idx_BK)
    return torch.gather(x_BT_, 1, idx_BK.unsqueeze(-1).expand(-1, -1, x_BT_.shape[-1]))


class Encoder(nn.Module):
    """Positions, optional CLS, input norm, prenet and main blocks, final norm: each part present
    where the configuration has it (1.0 audio: conv positions + input LN; 1.0 vision: CLS, relative
    position bias, final LN; 2.0 audio: conv positions, ALiBi scales, prenet; 2.0 image: sin-cos
    positions, CLS). `forward` runs the full sequence (the 1.0 student, every teacher);
    `encode_kept` runs only the unmasked tokens (the 2.0 student, MAE style).

    Only the main `blocks` are tapped for targets; `prenet` blocks run first and are never targets.
    Every parameter lives in a submodule that is called (never a bare parameter read in a method),
    so ZeRO-3's per-module gathering sees it.
    """

    def __init__(self, blocks: list[nn.Module], *, prenet: list[nn.Module] = (), pos_conv: nn.Module | None = None,
                 sincos: nn.Module | None = None, alibi: nn.Module | None = None, cls_token: bool = False,
                 rel_pos_bias: nn.Module | None = None, layer_norm: nn.Module | None = None,
                 final_norm: nn.Module | None = None, dropout: float = 0.0, layerdrop: float = 0.0) -> None:
        super().__init__()
        if rel_pos_bias is not None and alibi is not None:
            raise ValueError("an encoder takes a relative position bias or ALiBi scales, not both")
        dim = blocks[0].attention.q_proj.in_features
        # Registration order fixes named_parameters(): the optimizer's and ZeRO's flattening order.
        self.pos_conv = pos_conv
        self.sincos = sincos
        self.alibi = alibi
        # A learned token prepended after masking (vision); outputs and taps exclude it.
        self.cls_token = ClsToken(dim) if cls_token else None
        self.rel_pos_bias = rel_pos_bias
        self.layer_norm = layer_norm
        self.dropout = nn.Dropout(dropout)
        self.prenet = nn.ModuleList(prenet)
        self.blocks = nn.ModuleList(blocks)  # the main blocks: the teacher taps these
        self.final_norm = final_norm
        self.layerdrop = layerdrop
        self.blocks_run = len(self.prenet) + len(self.blocks)
        # Recompute each block in backward instead of storing its activations (set by the trainer).
        self.checkpoint_blocks = False

    @property
    def num_extra_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    def streaming_units(self) -> list[nn.Module]:
        """The modules holding parameters, in the order `forward` calls them (the offloaded teacher
        streams one at a time)."""
        return [m for m in (self.pos_conv, self.cls_token, self.layer_norm, self.rel_pos_bias, self.alibi,
                            *self.prenet, *self.blocks, self.final_norm) if m is not None]

    def kept_blocks(self, layer_seed: int | None) -> list[int]:
        """Indices over prenet + main blocks run in this forward (all of them outside training; one
        draw per block, the same on every rank)."""
        return layerdrop_kept(len(self.prenet) + len(self.blocks), self.layerdrop if self.training else 0.0,
                              layer_seed)

    def _run(self, x_BTD: Tensor, padding_mask_BT: Tensor | None, positions_BT: Tensor | None,
             layer_seed: int | None, tap: Tap | None) -> Tensor:
        extra = self.num_extra_tokens
        x_BTD, padding_mask_BT = enter_blocks(x_BTD, padding_mask_BT, self.cls_token, self.layer_norm, self.dropout)
        if self.rel_pos_bias is not None:
            bias = self.rel_pos_bias()
        elif self.alibi is not None:
            bias = self.alibi(positions_BT)  # the kept tokens' original positions (None: all)
        else:
            bias = None
        npre = len(self.prenet)
        kept = self.kept_blocks(layer_seed)
        self.blocks_run = len(kept)  # what this forward computed (the FLOPs logged count it)
        for i in kept:
            block = self.prenet[i] if i < npre else self.blocks[i - npre]
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                out = checkpoint(block, x_BTD, padding_mask_BT, bias, use_reentrant=False)
            else:
                out = block(x_BTD, padding_mask_BT, bias)
            if tap is not None and i >= npre:
                tap(i - npre, out if extra == 0 else BlockOutput(out.x[:, extra:], out.ffn[:, extra:]))
            x_BTD = out.x
        if self.final_norm is not None:
            x_BTD = self.final_norm(x_BTD)
        return x_BTD

    def _add_positions(self, x_BTD: Tensor, padding_mask_BT: Tensor | None, mask_BT: Tensor | None) -> Tensor:
        if self.pos_conv is not None:
            # Masked frames are zeroed so the positional conv cannot leak what they held.
            conv_in = x_BTD if mask_BT is None else x_BTD.masked_fill(mask_BT.unsqueeze(-1), 0.0)
            x_BTD = x_BTD + self.pos_conv(conv_in, padding_mask_BT)
        if self.sincos is not None:
            x_BTD = self.sincos(x_BTD)
        return x_BTD

    def forward(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None, *,
                layer_seed: int | None = None, tap: Tap | None = None) -> Tensor:
        """The full sequence: B×(E+T)×D with the E extra tokens (CLS) first; taps see the main
        blocks' T positions."""
        x_BTD = self._add_positions(x_BTD, padding_mask_BT, None)
        return self._run(x_BTD, padding_mask_BT, None, layer_seed, tap)

    def encode_kept(self, x_BTD: Tensor, mask_BT: Tensor, padding_mask_BT: Tensor | None = None, *,
                    layer_seed: int | None = None, kept_BK: Tensor | None = None,
                    kept_padding: bool | None = None) -> tuple[Tensor, Tensor]:
        """Positions over the full sequence, then only the unmasked tokens are encoded.

        Returns (B×(E+K)×D encoder output with the extra tokens first, B×K kept positions).
        kept_BK / kept_padding: worked out on the host with the batch (no device read here).
        """
        x_BTD = self._add_positions(x_BTD, padding_mask_BT, mask_BT)
        keep_BK = kept_positions(mask_BT) if kept_BK is None else kept_BK
        x_BKD = gather_rows(x_BTD, keep_BK)
        padding_BK = gather_rows(padding_mask_BT, keep_BK) if padding_mask_BT is not None else None
        if kept_padding is None:
            kept_padding = padding_BK is not None and bool(padding_BK.any())
        if not kept_padding:
            padding_BK = None
        positions = keep_BK if self.alibi is not None else None
        return self._run(x_BKD, padding_BK, positions, layer_seed, None), keep_BK
