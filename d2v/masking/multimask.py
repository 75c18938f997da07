"""data2vec 2.0 masks for the collate step (docs/method.md §3.3): M masks per sample, B×M×T bool
(True = masked, dropped from the student's input and predicted), with the same number of kept
tokens in every row so the student gathers them densely.

* block_1d (audio): blocks of `block` frames, exactly int(T·R) masked per row;
* inverse_block_2d (image): block×block squares mark what to keep, exactly int(N·(1−R)) kept;
* random (text): exactly int(T·(1−R)) kept per row, chosen among the non-padded tokens first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from d2v.config.mask_kinds import MASK_KINDS
from d2v.config.modalities import modality_spec
from d2v.masking.exact_count import block_mask_1d, inverse_block_mask_2d, random_mask

KINDS = tuple(kind for kind, variant in MASK_KINDS.items() if variant.clones)


@dataclass(frozen=True)
class MultiMaskFn:
    """Picklable 2.0 mask maker (loader workers may be spawned): __call__ -> B×M×T bool."""

    kind: str
    num_masks: int
    mask_prob: float
    block: int = 5
    adjust: float = 0.05
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown 2.0 mask kind {self.kind!r}; use one of {KINDS}")
        if self.kind == "inverse_block_2d" and self.grid is None:
            raise ValueError("inverse_block_2d masks need the patch grid")

    def __call__(self, batch_size: int, length: int, padding_mask: Tensor | None,
                 generator: torch.Generator) -> Tensor:
        rows = batch_size * self.num_masks
        if self.kind == "random":
            pad = padding_mask.repeat_interleave(self.num_masks, 0) if padding_mask is not None else None
            mask = random_mask(rows, length, mask_prob=self.mask_prob, padding_mask=pad, generator=generator)
        elif padding_mask is not None and bool(padding_mask.any()):
            raise ValueError(f"{self.kind} masks need unpadded rows of equal length (audio: data.pad=false)")
        elif self.kind == "block_1d":
            mask = block_mask_1d(rows, length, mask_prob=self.mask_prob, block=self.block, adjust=self.adjust,
                                 generator=generator)
        else:
            if self.grid[0] * self.grid[1] != length:
                raise ValueError(f"grid {self.grid} does not have {length} patches")
            mask = inverse_block_mask_2d(rows, self.grid, mask_prob=self.mask_prob, block=self.block,
                                         adjust=self.adjust, generator=generator)
        return mask.view(batch_size, self.num_masks, length)


def multi_mask_fn(cfg) -> MultiMaskFn:
    """The 2.0 mask maker of a D2vConfig (masking.kind one of KINDS)."""
    m, mk = cfg.model, cfg.masking
    grid = modality_spec(m.modality).grid(m)
    return MultiMaskFn(mk.kind, m.v2.num_masks, mk.mask_prob, mk.block_width, mk.mask_adjust, grid)
