"""The run's mask maker, chosen by `masking.kind` (the tagged union of d2v/config/mask_kinds.py).

Every kind is one picklable callable with one signature (spawned loader workers may hold it),

    masks(batch_size, length, padding_mask B×T or None, generator) -> bool, True = masked,

giving B×T (one mask per sample: the student fills the masked positions) or B×M×T (M clones,
data2vec 2.0). The collate steps of every modality call it without knowing the kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from d2v.config.mask_kinds import (
    BertMask, Block1dMask, Block2dMask, InverseBlock2dMask, RandomMask, SpanMask, TextSpanMask, mask_config,
)
from d2v.config.modalities import modality_spec
from d2v.masking.beit_blocks import block_mask_2d
from d2v.masking.multimask import multi_mask_fn
from d2v.masking.span import span_mask
from d2v.masking.text import text_span_mask

MaskFn = Callable[[int, int, "Tensor | None", torch.Generator], Tensor]


@dataclass(frozen=True)
class SpanMasks:
    """wav2vec 2.0 spans over frames (audio 1.0, docs/method.md §3.2)."""

    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 1
    equalize: str | None = "min"

    def __call__(self, batch_size: int, length: int, padding_mask: Tensor | None,
                 generator: torch.Generator) -> Tensor:
        return span_mask(batch_size, length, mask_prob=self.mask_prob, mask_length=self.mask_length,
                         min_masks=self.min_masks, padding_mask=padding_mask, equalize=self.equalize,
                         generator=generator)


@dataclass(frozen=True)
class BlockMasks2d:
    """BEiT's blockwise masks over the patch grid (image 1.0)."""

    grid: tuple[int, int]
    num_masked: int
    min_block: int
    max_block: int | None
    min_aspect: float
    top_up: bool

    def __call__(self, batch_size: int, length: int, padding_mask: Tensor | None,
                 generator: torch.Generator) -> Tensor:
        if length != self.grid[0] * self.grid[1]:
            raise ValueError(f"grid {self.grid} does not have {length} patches")
        return block_mask_2d(batch_size, self.grid, num_masked=self.num_masked, min_block=self.min_block,
                             max_block=self.max_block, min_aspect=self.min_aspect, top_up=self.top_up,
                             generator=generator)


@dataclass(frozen=True)
class TokenSpanMasks:
    """Spans of tokens to predict (text 1.0; BERT's selection is spans of one); padding never selected."""

    mask_prob: float
    mask_length: int

    def __call__(self, batch_size: int, length: int, padding_mask: Tensor | None,
                 generator: torch.Generator) -> Tensor:
        return text_span_mask(batch_size, length, mask_prob=self.mask_prob, mask_length=self.mask_length,
                              padding_mask=padding_mask, generator=generator)


def _spans(cfg, kind: SpanMask) -> MaskFn:
    return SpanMasks(kind.mask_prob, kind.mask_length, kind.min_masks, kind.equalize)


def _blocks_2d(cfg, kind: Block2dMask) -> MaskFn:
    grid = modality_spec(cfg.model.modality).grid(cfg.model)
    if grid is None:
        raise ValueError(f"masking.kind=block_2d needs positions on a grid; model.modality={cfg.model.modality!r} "
                         f"has none")
    return BlockMasks2d(grid, kind.num_mask_patches, kind.min_block_patches, kind.max_block_patches,
                        kind.min_aspect, kind.top_up)


def _token_spans(cfg, kind: TextSpanMask | BertMask) -> MaskFn:
    return TokenSpanMasks(kind.mask_prob, kind.mask_length)


def _clones(cfg, kind) -> MaskFn:
    return multi_mask_fn(cfg)


MAKERS: dict[type, Callable] = {SpanMask: _spans, Block2dMask: _blocks_2d, TextSpanMask: _token_spans,
                                BertMask: _token_spans, Block1dMask: _clones, InverseBlock2dMask: _clones,
                                RandomMask: _clones}


def mask_maker(cfg) -> MaskFn:
    """The mask maker of a D2vConfig's masking section."""
    kind = mask_config(cfg.masking)
    return MAKERS[type(kind)](cfg, kind)
