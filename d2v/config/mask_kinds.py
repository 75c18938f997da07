"""The mask generators as a tagged union: `masking.kind` is the tag, and each kind is a dataclass
holding only the `masking.*` settings it reads, with its own checks (docs/method.md §2, §3.3).

The config file keeps one flat `masking` section (so that a preset and an override spell a
setting the same way for every kind); `mask_config(section)` reads the chosen kind out of it.
Checks that relate masking to other sections (the image's patch count, the modality's kinds)
stay with the cross-section checks in d2v/config/validate.py.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar


@dataclass(frozen=True)
class _MaskKind:
    kind: ClassVar[str]
    clones: ClassVar[bool] = False
    """Whether this is a 2.0 mask: M masks per sample, exact counts per row (kept tokens gather densely)."""

    def problems(self) -> list[str]:
        return []

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _probability(name: str, value: float, *, open_interval: bool = False) -> list[str]:
    if open_interval and not 0.0 < value < 1.0:
        return [f"masking.{name}={value} must be in (0, 1) for 2.0 masks"]
    if not 0.0 <= value <= 1.0:
        return [f"masking.{name}={value} must be in [0, 1]"]
    return []


def _spans(mask_prob: float, mask_length: int) -> list[str]:
    p = _probability("mask_prob", mask_prob)
    if mask_length < 1:
        p.append("masking.mask_length must be >= 1")
    return p


def _replacement(random_token_prob: float, leave_unmasked_prob: float) -> list[str]:
    if random_token_prob + leave_unmasked_prob > 1:
        return ["masking.random_token_prob + masking.leave_unmasked_prob must be <= 1"]
    return []


@dataclass(frozen=True)
class SpanMask(_MaskKind):
    """wav2vec 2.0 spans (audio 1.0): starts drawn with probability mask_prob, mask_length frames each."""
    kind: ClassVar[str] = "span"
    mask_prob: float
    mask_length: int
    min_masks: int
    equalize: str | None

    def problems(self) -> list[str]:
        p = _spans(self.mask_prob, self.mask_length)
        if self.equalize not in ("min", "target", None):
            p.append(f"masking.equalize={self.equalize!r}: use min, target or null")
        return p


@dataclass(frozen=True)
class Block2dMask(_MaskKind):
    """BEiT's blockwise masking (image 1.0): blocks of patches until num_mask_patches are masked."""
    kind: ClassVar[str] = "block_2d"
    num_mask_patches: int
    min_block_patches: int
    max_block_patches: int | None
    min_aspect: float
    top_up: bool

    def problems(self) -> list[str]:
        p = []
        if self.num_mask_patches < 0 or self.min_block_patches < 1:
            p.append("masking.num_mask_patches must be >= 0 and masking.min_block_patches >= 1")
        if self.max_block_patches is not None and self.max_block_patches < self.min_block_patches:
            p.append(f"masking.max_block_patches={self.max_block_patches} is below "
                     f"masking.min_block_patches={self.min_block_patches}")
        if not 0.0 < self.min_aspect <= 1.0:
            p.append(f"masking.min_aspect={self.min_aspect} must be in (0, 1]")
        return p


@dataclass(frozen=True)
class TextSpanMask(_MaskKind):
    """Spans of <mask> tokens (text 1.0)."""
    kind: ClassVar[str] = "text_span"
    mask_prob: float
    mask_length: int
    random_token_prob: float
    leave_unmasked_prob: float

    def problems(self) -> list[str]:
        return _spans(self.mask_prob, self.mask_length) + _replacement(self.random_token_prob,
                                                                       self.leave_unmasked_prob)


@dataclass(frozen=True)
class BertMask(_MaskKind):
    """BERT's token selection, then <mask> / random token / unchanged."""
    kind: ClassVar[str] = "bert"
    mask_length: ClassVar[int] = 1
    """BERT selects single tokens: spans of one (masking.mask_length is not read)."""
    mask_prob: float
    random_token_prob: float
    leave_unmasked_prob: float

    def problems(self) -> list[str]:
        return _probability("mask_prob", self.mask_prob) + _replacement(self.random_token_prob,
                                                                        self.leave_unmasked_prob)


@dataclass(frozen=True)
class _BlockMask2_0(_MaskKind):
    clones: ClassVar[bool] = True
    mask_prob: float
    block_width: int
    mask_adjust: float

    def problems(self) -> list[str]:
        p = _probability("mask_prob", self.mask_prob, open_interval=True)
        if self.block_width < 1 or self.mask_adjust < 0:
            p.append("masking.block_width must be >= 1 and masking.mask_adjust >= 0")
        return p


@dataclass(frozen=True)
class Block1dMask(_BlockMask2_0):
    """2.0 audio: blocks of block_width frames, exactly int(T·mask_prob) masked per row."""
    kind: ClassVar[str] = "block_1d"


@dataclass(frozen=True)
class InverseBlock2dMask(_BlockMask2_0):
    """2.0 image: block_width² squares of kept patches, exactly int(T·(1 − mask_prob)) kept per row."""
    kind: ClassVar[str] = "inverse_block_2d"


@dataclass(frozen=True)
class RandomMask(_MaskKind):
    """2.0 text: exactly int(T·(1 − mask_prob)) tokens kept per row, uniformly at random."""
    kind: ClassVar[str] = "random"
    clones: ClassVar[bool] = True
    mask_prob: float

    def problems(self) -> list[str]:
        return _probability("mask_prob", self.mask_prob, open_interval=True)


MASK_KINDS: dict[str, type[_MaskKind]] = {c.kind: c for c in (SpanMask, Block2dMask, TextSpanMask, BertMask,
                                                                Block1dMask, InverseBlock2dMask, RandomMask)}


def mask_config(section) -> _MaskKind:
    """The chosen kind of a config's `masking` section, holding only the settings it reads."""
    try:
        cls = MASK_KINDS[section.kind]
    except KeyError:
        raise ValueError(f"masking.kind={section.kind!r} is not a mask generator; use one of "
                         f"{sorted(MASK_KINDS)}") from None
    return cls(**{name: getattr(section, name) for name in cls.settings()})
