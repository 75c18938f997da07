"""data2vec 2.0 masks (docs/method.md §3.3; the reference's compute_block_mask_1d/2d and MAE's random
masking), made in the collate step with an exact count per row so kept tokens gather densely.

Block masks: with R the masked fraction, A the adjustment and B the block width, draw
int(T·(R+A)/B) (1-D) or int(T·(R+A)/B²) (2-D) centres with replacement, mark a width-B span or a
B×B square around each (clipped at borders, overlaps allowed), then add or remove random marked
positions until exactly int(T·R) are marked. `inverse` blocks mark what to keep: the marked
fraction is 1−R and the result is flipped (image: keep 39 of 196, mask 157).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _exact(marked: Tensor, count: int, g: torch.Generator) -> None:
    """Adds or removes random marked positions of each row (in place) until `count` are marked."""
    for row in marked:
        idx_on = row.nonzero().flatten()
        have = idx_on.numel()
        if have > count:
            row[idx_on[torch.randperm(have, generator=g)[: have - count]]] = False
        elif have < count:
            idx_off = (~row).nonzero().flatten()
            row[idx_off[torch.randperm(idx_off.numel(), generator=g)[: count - have]]] = True


def block_mask_1d(batch_size: int, length: int, *, mask_prob: float = 0.5, block: int = 5, adjust: float = 0.05,
                  generator: torch.Generator | None = None) -> Tensor:
    """B×T bool, exactly int(T·mask_prob) True per row, in blocks of `block` (audio 2.0)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    centres = max(1, int(length * (mask_prob + adjust) / block))
    starts = torch.randint(0, length, (batch_size, centres), generator=g) - block // 2
    idx = (starts[..., None] + torch.arange(block)).clamp_(0, length - 1).flatten(1)
    marked = torch.zeros(batch_size, length, dtype=torch.bool)
    marked.scatter_(1, idx, True)
    _exact(marked, int(length * mask_prob), g)
    return marked


def centred_block_mask_2d(batch_size: int, grid: tuple[int, int], *, mask_prob: float, block: int = 3,
                     adjust: float = 0.0, inverse: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """B×(H·W) bool over a patch grid (row-major), exactly int(H·W·R) masked per row."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    H, W = grid
    n = H * W
    rate = 1.0 - mask_prob if inverse else mask_prob
    centres = max(1, int(n * (rate + adjust) / block**2))
    cy = torch.randint(0, H, (batch_size, centres), generator=g) - block // 2
    cx = torch.randint(0, W, (batch_size, centres), generator=g) - block // 2
    off = torch.arange(block)
    ys = (cy[..., None, None] + off[:, None]).clamp(0, H - 1)
    xs = (cx[..., None, None] + off[None, :]).clamp(0, W - 1)
    marked = torch.zeros(batch_size, n, dtype=torch.bool)
    marked.scatter_(1, (ys * W + xs).flatten(1), True)
    _exact(marked, int(n * rate), g)
    return ~marked if inverse else marked


def inverse_block_mask_2d(batch_size: int, grid: tuple[int, int], *, mask_prob: float = 0.8, block: int = 3,
                          adjust: float = 0.07, generator: torch.Generator | None = None) -> Tensor:
    """Image 2.0: 3×3 blocks mark what to keep; keeps exactly int(H·W·(1−R)) patches (39 of 196)."""
    return centred_block_mask_2d(batch_size, grid, mask_prob=mask_prob, block=block, adjust=adjust, inverse=True,
                            generator=generator)


def random_mask(rows: int, length: int, *, mask_prob: float, padding_mask: Tensor | None,
                generator: torch.Generator) -> Tensor:
    """Text 2.0 (MAE's random masking): rows×T bool, exactly int(T·(1−R)) False (kept) per row,
    chosen uniformly among the real tokens (R=0.48 at T=512: 266 kept, 246 masked). Padded tokens
    are kept only when a row has fewer real tokens than that (they stay padding in the encoder and
    are never targets)."""
    keep = int(length * (1.0 - mask_prob))
    noise = torch.rand(rows, length, generator=generator)
    if padding_mask is not None:
        noise = noise + padding_mask.to(noise.dtype)  # real tokens (noise < 1) sort first
    order = noise.argsort(dim=1)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], False)
    return mask
