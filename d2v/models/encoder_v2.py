"""The data2vec 2.0 encoder (docs/method.md §3.3): positions, optional CLS, input LayerNorm, prenet and
main post-LN blocks, run either over the full sequence (the teacher) or over the kept tokens only
(the student, MAE style).

Legend: B batch (the student's B is B·M clones), T sequence, K kept tokens per row, D width,
H heads, E extra tokens (CLS).
Positions are added before dropping: audio's conv positional encoder runs over the full sequence
with the masked frames zeroed and is gathered at the kept positions; image adds a fixed 2-D
sin-cos table. Audio's ALiBi bias uses the original positions of the kept tokens, so distances
stay those of the full sequence. Every parameter lives in a submodule that is called (never a
bare parameter read in a method), so ZeRO-3's per-module gathering sees it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import kernels
from d2v.batch import kept_positions
from d2v.models.blocks import BlockOutput
from d2v.models.encoder import ClsToken, Tap, enter_blocks, layerdrop_kept


class AlibiScale(nn.Module):
    """A learned per-head ALiBi scale, clamped at >= 0 when used (a module so ZeRO-3 gathers it)."""

    def __init__(self, num_heads: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((num_heads,), float(init)))
        self.register_buffer("slopes", kernels.alibi_slopes(num_heads), persistent=False)

    def forward(self, positions_BT: Tensor | None) -> kernels.Alibi:
        return kernels.Alibi(self.slopes, self.scale.clamp_min(0.0), positions_BT)


def sincos_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """(H·W)×D fixed 2-D sin-cos positions (MAE): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    H, W = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")

    def embed(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # MAE's order: the first half encodes the column (x), the second the row (y).
    return torch.cat([embed(xs), embed(ys)], dim=1).float()


class SinCosPositions(nn.Module):
    """Adds the fixed sin-cos table (a buffer: copied with the module, never trained or averaged)."""

    def __init__(self, grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.register_buffer("table", sincos_2d(grid, dim), persistent=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        return x_BTD + self.table.to(x_BTD.dtype)


def kept_indices(mask_BT: Tensor) -> Tensor:
    """B×K ascending positions of the unmasked tokens; every row must keep the same number K."""
    return kept_positions(mask_BT)


def gather_rows(x_BT_: Tensor, idx_BK: Tensor) -> Tensor:
    """x[b, idx[b, k]] for B×T or B×T×D tensors."""
    if x_BT_.dim() == 2:
        return torch.gather(x_BT_, 1, idx_BK)
    return torch.gather(x_BT_, 1, idx_BK.unsqueeze(-1).expand(-1, -1, x_BT_.shape[-1]))


class EncoderV2(nn.Module):
    def __init__(self, prenet: list[nn.Module], blocks: list[nn.Module], *, pos_conv: nn.Module | None = None,
                 sincos: SinCosPositions | None = None, alibi: AlibiScale | None = None, cls_token: bool = False,
                 layer_norm: nn.Module | None = None, dropout: float = 0.0, layerdrop: float = 0.0) -> None:
        super().__init__()
        dim = blocks[0].attention.q_proj.in_features
        self.pos_conv = pos_conv
        self.sincos = sincos
        self.alibi = alibi
        self.cls_token = ClsToken(dim) if cls_token else None
        self.layer_norm = layer_norm
        self.dropout = nn.Dropout(dropout)
        self.prenet = nn.ModuleList(prenet)
        self.blocks = nn.ModuleList(blocks)  # the main blocks: the teacher taps these
        self.layerdrop = layerdrop
        self.checkpoint_blocks = False

    def streaming_units(self) -> list[nn.Module]:
        """The modules holding parameters, in the order `forward` calls them (the offloaded teacher
        streams one at a time): positions, CLS, input norm, ALiBi scales, prenet, main blocks."""
        return [m for m in (self.pos_conv, self.cls_token, self.layer_norm, self.alibi, *self.prenet, *self.blocks)
                if m is not None]

    @property
    def num_extra_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    def kept_blocks(self, layer_seed: int | None) -> list[int]:
        """Indices over prenet + main blocks run in this forward (one draw per block, same on every rank)."""
        return layerdrop_kept(len(self.prenet) + len(self.blocks), self.layerdrop if self.training else 0.0,
                              layer_seed)

    def _run(self, x_BTD: Tensor, padding_mask_BT: Tensor | None, positions_BT: Tensor | None,
             layer_seed: int | None, tap: Tap | None) -> Tensor:
        extra = self.num_extra_tokens
        x_BTD, padding_mask_BT = enter_blocks(x_BTD, padding_mask_BT, self.cls_token, self.layer_norm, self.dropout)
        bias = self.alibi(positions_BT) if self.alibi is not None else None
        npre = len(self.prenet)
        for i in self.kept_blocks(layer_seed):
            block = self.prenet[i] if i < npre else self.blocks[i - npre]
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                out = checkpoint(block, x_BTD, padding_mask_BT, bias, use_reentrant=False)
            else:
                out = block(x_BTD, padding_mask_BT, bias)
            if tap is not None and i >= npre:
                tap(i - npre, out if extra == 0 else BlockOutput(out.x[:, extra:], out.ffn[:, extra:]))
            x_BTD = out.x
        return x_BTD

    def forward(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None, *,
                layer_seed: int | None = None, tap: Tap | None = None) -> Tensor:
        """The full sequence (the teacher): B×(E+T)×D; taps see the main blocks' T positions."""
        if self.pos_conv is not None:
            x_BTD = x_BTD + self.pos_conv(x_BTD, padding_mask_BT)
        if self.sincos is not None:
            x_BTD = self.sincos(x_BTD)
        return self._run(x_BTD, padding_mask_BT, None, layer_seed, tap)

    def encode_kept(self, x_BTD: Tensor, mask_BT: Tensor, padding_mask_BT: Tensor | None = None, *,
                    layer_seed: int | None = None, kept_BK: Tensor | None = None,
                    kept_padding: bool | None = None) -> tuple[Tensor, Tensor]:
        """The student: positions over the full sequence, then only the unmasked tokens are encoded.

        Returns (B×(E+K)×D encoder output with the extra tokens first, B×K kept positions).
        """
        if self.pos_conv is not None:
            # Masked frames are zeroed so the positional conv cannot leak what they held.
            x_BTD = x_BTD + self.pos_conv(x_BTD.masked_fill(mask_BT.unsqueeze(-1), 0.0), padding_mask_BT)
        if self.sincos is not None:
            x_BTD = self.sincos(x_BTD)
        # kept_BK / kept_padding: worked out on the host with the batch (no device read here).
        keep_BK = kept_indices(mask_BT) if kept_BK is None else kept_BK
        x_BKD = gather_rows(x_BTD, keep_BK)
        padding_BK = gather_rows(padding_mask_BT, keep_BK) if padding_mask_BT is not None else None
        if kept_padding is None:
            kept_padding = padding_BK is not None and bool(padding_BK.any())
        if not kept_padding:
            padding_BK = None
        positions = keep_BK if self.alibi is not None else None
        return self._run(x_BKD, padding_BK, positions, layer_seed, None), keep_BK

