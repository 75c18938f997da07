"""data2vec 2.0 conv decoders (docs/method.md §3.3): they predict the targets at every position from the
student's kept-token outputs.

Legend: B batch (B·M clones), T positions, K kept, D model width, C decoder width, H×W patch grid.
The kept outputs go back to their original positions, masked slots hold N(0, σ²) noise (the
inverse permutation of the drop); then layers of Conv(k, groups, same padding) -> LayerNorm
without affine -> GELU, with a residual around every layer whose widths match, then a Linear to D
(or Linear -> GELU -> Linear, text).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def fill_masked(x_BKD: Tensor, keep_BK: Tensor, length: int, noise_std: float) -> Tensor:
    """B×T×D: row b holds x[b, k] at position keep[b, k] and N(0, noise_std²) noise elsewhere."""
    B, K, D = x_BKD.shape
    full = x_BKD.new_empty(B, length, D).normal_(0.0, noise_std) if noise_std > 0 else x_BKD.new_zeros(B, length, D)
    return full.scatter(1, keep_BK.unsqueeze(-1).expand(-1, -1, D), x_BKD)


class DecoderLayer(nn.Module):
    """Conv (same length) -> LayerNorm over channels without affine -> GELU, channels-first."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int, dims: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv = conv(c_in, c_out, kernel, padding=kernel // 2, groups=groups)
        self.c_out = c_out

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = F.layer_norm(x.movedim(1, -1), (self.c_out,)).movedim(-1, 1)
        return F.gelu(x)


class ConvDecoder(nn.Module):
    """1-D (audio, text) or 2-D over the patch grid (image) conv decoder with a projection to D."""

    def __init__(self, dim: int, width: int, kernel: int, layers: int, groups: int, *, residual: bool,
                 projection_layers: int, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.grid = grid
        dims = 1 if grid is None else 2
        self.layers = nn.ModuleList(DecoderLayer(dim if i == 0 else width, width, kernel, groups, dims)
                                    for i in range(layers))
        self.residual = residual
        out = width if layers else dim
        if projection_layers == 1:
            self.proj = nn.Linear(out, dim)
        else:
            self.proj = nn.Sequential(nn.Linear(out, 2 * out), nn.GELU(), nn.Linear(2 * out, dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        x = x_BTD.transpose(1, 2)  # B×D×T
        if self.grid is not None:
            x = x.reshape(B, D, *self.grid)
        for layer in self.layers:
            y = layer(x)
            # A residual only where the widths match (not around the first layer when C != D).
            x = y + x if self.residual and y.shape == x.shape else y
        x = x.flatten(2).transpose(1, 2)  # B×T×C
        return self.proj(x)
