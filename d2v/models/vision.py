"""Image feature encoder and BEiT positions (data2vec 1.0 vision, docs/method.md §3.2, §8).

Legend: B batch, C channels, H×W patch grid, N = H·W patches, D width, h heads.
Names map onto transformers' Data2VecVisionModel: patch_embed.projection ~
embeddings.patch_embeddings.projection, encoder.cls_token ~ embeddings.cls_token,
encoder.rel_pos_bias.table ~ encoder.relative_position_bias.relative_position_bias_table.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from d2v.models.audio import Features


class PatchEmbed(nn.Module):
    """B×C×H·p×W·p image -> B×N×D patch embeddings (a stride-p convolution)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.projection = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: Tensor, lengths: Tensor | None = None, known=None) -> Features:
        if images.shape[-2:] != (self.grid[0] * self.projection.stride[0], self.grid[1] * self.projection.stride[1]):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model expects "
                             f"{self.grid[0] * self.projection.stride[0]}x{self.grid[1] * self.projection.stride[1]}")
        x = self.projection(images)  # B×D×H×W
        return Features(x.flatten(2).transpose(1, 2), None)


def relative_position_index(grid: tuple[int, int]) -> Tensor:
    """(N+1)×(N+1) indices into the bias table; the last three rows serve the CLS token."""
    H, W = grid
    coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")).flatten(1)  # 2×N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N×N×2
    rel[:, :, 0] += H - 1
    rel[:, :, 1] += W - 1
    num_distances = (2 * H - 1) * (2 * W - 1)
    index = torch.zeros(H * W + 1, H * W + 1, dtype=torch.long)
    index[1:, 1:] = rel[:, :, 0] * (2 * W - 1) + rel[:, :, 1]
    index[0, 1:] = num_distances      # CLS -> patch
    index[1:, 0] = num_distances + 1  # patch -> CLS
    index[0, 0] = num_distances + 2   # CLS -> CLS
    return index


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative offset, shared by all blocks (BEiT)."""

    def __init__(self, grid: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        H, W = grid
        self.table = nn.Parameter(torch.zeros((2 * H - 1) * (2 * W - 1) + 3, num_heads))  # BEiT: zeros
        self.register_buffer("index", relative_position_index(grid), persistent=False)

    def forward(self) -> Tensor:
        """1×h×(N+1)×(N+1) additive attention bias."""
        n = self.index.shape[0]
        return self.table[self.index.flatten()].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
