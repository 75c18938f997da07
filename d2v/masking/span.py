"""wav2vec 2.0 span masking, as data2vec 1.0 speech uses it (docs/method.md §3.2; the reference's
`compute_mask_indices` with mask_selection "static", no_overlap False, require_same_masks True).

For a row with `n` valid frames, draw k = max(min_masks, int(p·n/L + U[0,1))) distinct span
starts from [0, n−L) and mask [s, s+L) for each; overlapping spans merge, so p=0.65, L=10 masks
≈49% of frames. Rows of a batch then get equal counts:

* ``equalize="min"`` (the reference) trims every row to the batch's smallest count by random
  subsampling, so the effective rate falls with the batch size (≈0.491 for one row of 500
  frames, 0.475 at B=2, 0.449 at B=8, 0.420 at B=64);
* ``equalize="target"`` adds or removes random frames so every row has
  round(p_eff · n_min) masked frames, with p_eff = 1 − (1 − p/L)^L the expected rate of one
  row and n_min the batch's shortest valid length: the rate no longer depends on B;
* ``equalize=None`` leaves rows unequal.
"""
from __future__ import annotations

import torch
from torch import Tensor

EQUALIZE_MODES = ("min", "target", None)


def expected_span_rate(mask_prob: float, mask_length: int) -> float:
    """Expected masked fraction of a long row: 1 − (1 − p/L)^L."""
    return 1.0 - (1.0 - mask_prob / mask_length) ** mask_length


def _valid_lengths(batch_size: int, num_frames: int, padding_mask: Tensor | None) -> list[int]:
    if padding_mask is None:
        return [num_frames] * batch_size
    if padding_mask.shape != (batch_size, num_frames):
        raise ValueError(f"padding_mask has shape {tuple(padding_mask.shape)}, expected {(batch_size, num_frames)}")
    return (~padding_mask).sum(dim=1).tolist()


def _resize_row(row: Tensor, valid: int, count: int, generator: torch.Generator) -> None:
    """Randomly unmasks or masks frames of `row[:valid]` in place until `count` are masked."""
    masked = row[:valid].nonzero().flatten()
    have = masked.numel()
    if have > count:
        drop = masked[torch.randperm(have, generator=generator)[: have - count]]
        row[drop] = False
    elif have < count:
        free = (~row[:valid]).nonzero().flatten()
        add = free[torch.randperm(free.numel(), generator=generator)[: count - have]]
        row[add] = True


def span_mask(
    batch_size: int,
    num_frames: int,
    *,
    mask_prob: float = 0.65,
    mask_length: int = 10,
    min_masks: int = 1,
    padding_mask: Tensor | None = None,
    equalize: str | None = "min",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Returns a B×T bool mask (True = masked) that never marks padding.

    padding_mask: B×T bool, True at padded frames (each row's valid frames must come first).
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    if equalize not in EQUALIZE_MODES:
        raise ValueError(f"equalize must be one of {EQUALIZE_MODES}, got {equalize!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch_size, num_frames, dtype=torch.bool)
    lengths = _valid_lengths(batch_size, num_frames, padding_mask)
    for b, n in enumerate(lengths):
        if n <= 0 or mask_prob == 0.0:
            continue
        span = min(mask_length, n)
        # Probabilistic rounding, as the reference: int(p·n/L + U[0, 1)).
        u = torch.rand((), generator=generator).item()
        starts_available = max(n - span, 1)
        k = max(min_masks, int(mask_prob * n / span + u))
        k = min(k, starts_available)
        starts = torch.randperm(starts_available, generator=generator)[:k]
        idx = (starts[:, None] + torch.arange(span)[None, :]).flatten().clamp_(max=n - 1)
        mask[b, idx] = True
    if equalize is None or batch_size == 0:
        return mask
    if equalize == "min":
        count = int(mask.sum(dim=1).min().item())
    else:
        count = round(expected_span_rate(mask_prob, mask_length) * min(lengths)) if mask_prob > 0 else 0
    for b, n in enumerate(lengths):
        _resize_row(mask[b], n, min(count, n), generator)
    return mask


def mask_rate(mask: Tensor, padding_mask: Tensor | None = None) -> float:
    """Masked fraction of the valid (non-padded) positions: the effective mask rate."""
    valid = mask.numel() if padding_mask is None else int((~padding_mask).sum().item())
    return float(mask.sum().item()) / max(valid, 1)
