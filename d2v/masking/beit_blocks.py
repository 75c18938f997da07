"""BEiT block-wise masking for images (data2vec 1.0 vision, docs/method.md §3.2).

Blocks are added until the image has `num_masked` masked patches. Each block has an area drawn
from U[min_block, min(remaining, max_block)] and an aspect ratio r = exp(U[log a, log 1/a]),
is h = round(sqrt(area·r)) by w = round(sqrt(area/r)) patches at a random corner, and is kept
only if it masks between 1 and `remaining` new patches (up to 10 attempts). The reference
generator can stop short of the target (about a third of images end between ~100 and 119 of
120); with `top_up` (the d2v default) random unmasked patches fill the rest, so every image
has exactly the target. It never exceeds the target either way.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _randint(lo: int, hi_inclusive: int, g: torch.Generator) -> int:
    return int(torch.randint(lo, hi_inclusive + 1, (), generator=g).item())


def _add_block(mask: Tensor, max_new: int, min_block: int, min_aspect: float, g: torch.Generator) -> int:
    """Tries up to 10 blocks; masks the first that adds 1..max_new patches. Returns patches added."""
    H, W = mask.shape
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    for _ in range(10):
        area = _uniform(min_block, max_new, g)
        aspect = math.exp(_uniform(log_lo, log_hi, g))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w < W and h < H:
            top, left = _randint(0, H - h, g), _randint(0, W - w, g)
            window = mask[top:top + h, left:left + w]
            new = h * w - int(window.sum())
            if 0 < new <= max_new:
                window.fill_(True)
                return new
    return 0


def block_mask_2d(
    batch_size: int,
    grid: tuple[int, int],
    *,
    num_masked: int = 120,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    top_up: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Returns a B×(H·W) bool mask over patches in row-major order (True = masked)."""
    H, W = grid
    if not 0 <= num_masked <= H * W:
        raise ValueError(f"num_masked={num_masked} must be in [0, {H * W}] for a {H}x{W} grid")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect={min_aspect} must be in (0, 1]")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    cap = max_block if max_block is not None else num_masked
    out = torch.zeros(batch_size, H * W, dtype=torch.bool)
    for b in range(batch_size):
        mask = torch.zeros(H, W, dtype=torch.bool)
        count = 0
        while count < num_masked:
            added = _add_block(mask, min(num_masked - count, cap), min_block, min_aspect, g)
            if added == 0:
                break
            count += added
        flat = mask.flatten()
        if top_up and count < num_masked:
            free = (~flat).nonzero().flatten()
            flat[free[torch.randperm(free.numel(), generator=g)[: num_masked - count]]] = True
        out[b] = flat
    return out
