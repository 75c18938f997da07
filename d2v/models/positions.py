"""Position information the data2vec 2.0 encoders add (docs/method.md §3.3): audio's learned ALiBi
scales over the fixed ALiBi slopes, image's fixed 2-D sin-cos table. (1.0 uses the conv positional
encoder of models/audio.py and vision's relative position bias of models/vision.py.)"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from d2v import kernels
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
