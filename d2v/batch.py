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
class Batch:
    """One micro-batch.

    source: the clean input. audio B×S float waveform (zero-padded), image B×3×H×W float,
        text B×T int64 tokens.
    mask: B×T bool, True where the student's input is masked (targets are predicted there);
        data2vec 2.0: B×M×T, M masks per sample (masked tokens are dropped from the student's input).
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

    @property
    def batch_size(self) -> int:
        return int(self.source.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """Moves tensors to `device`; floating-point `source` is cast to `dtype` when given."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                cast = dtype if (dtype is not None and value.is_floating_point()) else None
                value = value.to(device=device, dtype=cast, non_blocking=True)
            moved[f.name] = value
        return replace(self, **moved)

    def rows(self, start: int, end: int) -> "Batch":
        """Rows [start, end) of every per-sample field (a rank's share of a global batch)."""
        sliced: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) or (isinstance(value, list) and f.name == "keys"):
                value = value[start:end]
            sliced[f.name] = value
        return replace(self, **sliced)
