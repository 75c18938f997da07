"""The micro-batch contract between the data pipeline (collate) and the task.

Masks are made in the collate step (docs/method.md §2), so a Batch arrives with them. Legend:
B batch, S waveform samples, T model sequence length (frames, patches or tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class TargetIndex:
    """Where a micro-batch's targets are, worked out on the host before the batch moves to the
    device: the training step then gathers with these indices instead of indexing with a mask
    (boolean indexing and `.item()` make the host wait for the device).

    M is the number of clones of every sample (1 for 1.0, whose student fills the masked
    positions); rows are the B·M clones in sample-major order.
    """

    targets: Tensor
    """P int64 flattened positions (row·T + t) that are masked and not padding, row-major."""
    num_targets: int
    mask_rate: float
    """Targets per real (non-padded) position."""
    padding_mask: Tensor | None
    """The batch's B×T padding mask (None: no row is padded)."""
    kept: Tensor | None = None
    """(B·M)×K int64 ascending unmasked positions of every clone (2.0), else None."""
    kept_padding: bool = False
    """Whether any kept position is padding (2.0)."""
    positions: int = 0
    """Real (non-padded) positions of the batch, counted once per sample (not per clone)."""

    def to(self, device: torch.device | str) -> "TargetIndex":
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(self, targets=move(self.targets), padding_mask=move(self.padding_mask), kept=move(self.kept))

    def pin_memory(self) -> "TargetIndex":
        def pin(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory()

        return replace(self, targets=pin(self.targets), padding_mask=pin(self.padding_mask), kept=pin(self.kept))


def as_clone_masks(mask: Tensor) -> Tensor:
    """B×M×T masks: a B×T mask (one per sample) is M = 1."""
    return mask.unsqueeze(1) if mask.dim() == 2 else mask


def kept_positions(mask_NT: Tensor) -> Tensor:
    """N×K ascending positions of the unmasked tokens; every row must keep the same number K
    (a data2vec 2.0 student encodes K tokens per clone)."""
    kept = (~mask_NT).sum(dim=1)
    if kept.numel() and bool((kept != kept[0]).any()):
        counts = sorted(set(kept.tolist()))
        raise ValueError(f"2.0 masks must keep the same number of tokens in every row, got {counts}; "
                         f"make masks with the 2.0 generators (exact counts per row)")
    K = int(kept[0]) if kept.numel() else 0
    # A stable sort puts kept positions (0) first, in their original order.
    return torch.sort(mask_NT.to(torch.int8), dim=1, stable=True).indices[:, :K]


def target_index(mask: Tensor, padding_mask: Tensor | None, *, drops_masked: bool) -> TargetIndex:
    """The TargetIndex of a host mask (B×M×T; a B×T mask is M = 1) and padding mask (B×T or None).
    drops_masked: whether the student drops the masked positions (then the kept ones are indexed
    too, and a mask may cover padding, which is simply not a target)."""
    if mask.device.type != "cpu":
        raise ValueError("target_index works on the host copy of a batch (before Batch.to)")
    mask = as_clone_masks(mask)
    B, M, T = mask.shape
    if M != 1 and not drops_masked:
        raise ValueError(f"the batch carries {M} masks per sample, but a student that fills the masked positions "
                         f"takes one (M = 1)")
    mask_NT = mask.reshape(B * M, T)
    pad_NT = None if padding_mask is None else padding_mask.repeat_interleave(M, dim=0)
    if pad_NT is not None and not drops_masked and bool((mask_NT & pad_NT).any()):
        raise ValueError("the mask marks padded positions; masks must respect padding")
    valid = mask_NT if pad_NT is None else mask_NT & ~pad_NT
    targets = valid.flatten().nonzero().flatten()
    real = B * M * T if padding_mask is None else int((~padding_mask).sum()) * M
    kept, kept_padding = None, False
    if drops_masked:
        kept = kept_positions(mask_NT)
        kept_padding = pad_NT is not None and bool(torch.gather(pad_NT, 1, kept).any())
    return TargetIndex(targets, int(targets.numel()), targets.numel() / max(real, 1), padding_mask, kept, kept_padding,
                       real // M)


@dataclass
class Batch:
    """One micro-batch.

    source: the clean input. audio B×S float waveform (zero-padded), image B×3×H×W float,
        text B×T int64 tokens.
    mask: B×M×T bool, True where the student's input is masked (targets are predicted there): M
        masks per sample, each a clone of the sample (data2vec 2.0; masked tokens are dropped
        from the student's input), or M = 1 (1.0). A B×T mask given here is stored as B×1×T.
    padding_mask: B×T bool at the model's sequence level, True at padding; None if no row is padded.
    source_lengths: B int64 valid samples per row (audio), else None.
    masked_source: a student view built in collate (text: tokens with `<mask>`/random
        replacements); None when the model masks features itself with a learned embedding.
    keys: sample keys, for reports and debugging.
    extras: anything else a task may need (labels, transcripts), never used by pretraining.
    """

    source: Tensor
    mask: Tensor
    padding_mask: Tensor | None = None
    source_lengths: Tensor | None = None
    masked_source: Tensor | None = None
    keys: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    index: TargetIndex | None = None
    """Host-derived target positions (`with_index`), or None."""

    def __post_init__(self) -> None:
        self.mask = as_clone_masks(self.mask)

    @property
    def batch_size(self) -> int:
        return int(self.source.shape[0])

    def with_index(self, *, drops_masked: bool) -> "Batch":
        """This host batch with its TargetIndex (computed once); drops_masked: see target_index."""
        if self.index is not None:
            return self
        return replace(self, index=target_index(self.mask, self.padding_mask, drops_masked=drops_masked))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """Moves tensors to `device`; floating-point `source` is cast to `dtype` when given.
        Non-blocking: from pinned memory (`pin_memory`) the copy overlaps the device's work."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device=device, non_blocking=True)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)  # cast on the device: the host copy stays small and pinned
            elif isinstance(value, TargetIndex):
                value = value.to(device)
            moved[f.name] = value
        return replace(self, **moved)

    def pin_memory(self) -> "Batch":
        """Pinned copies of the tensors (torch's DataLoader calls this with pin_memory=True)."""
        pinned: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (Tensor, TargetIndex)):
                value = value.pin_memory()
            pinned[f.name] = value
        return replace(self, **pinned)

    def rows(self, start: int, end: int) -> "Batch":
        """Rows [start, end) of every per-sample field (a rank's share of a global batch)."""
        sliced: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) or (isinstance(value, list) and f.name == "keys"):
                value = value[start:end]
            elif isinstance(value, TargetIndex):
                value = None  # positions of the whole batch: recomputed for the slice when needed
            sliced[f.name] = value
        return replace(self, **sliced)
