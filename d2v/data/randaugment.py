"""RandAugment on PIL images, in the convention of timm's `rand_augment_transform` that the image
fine-tuning references use (BEiT / data2vec_vision `--aa rand-m9-mstd0.5-inc1`, fairseq's
`mae_finetuning_image_dataset.py` through timm's `create_transform`).

A policy string `rand-m{M}-n{N}-mstd{S}-inc{0|1}` (any order after `rand`; defaults n=2, mstd=0,
inc=0) means: for each image, draw N operations with replacement from the list, each applied with
probability 1/2 at a magnitude drawn from N(M, S) clipped to [0, 10]. With `inc1` the magnitude-
dependent colour operations grow stronger with the magnitude (posterize keeps fewer bits, solarize
lowers its threshold, the enhancers move further from 1), instead of timm's legacy direction.

Levels at magnitude m (of 10): rotate ±30·m/10 degrees, shear ±0.3·m/10, translate ±0.45·m/10 of
the image side, enhance factor 1 ± 0.9·m/10, posterize to 4 - int(4·m/10) bits, solarize above
256 - int(256·m/10), solarize-add +int(110·m/10) below 128. Signs are drawn with probability 1/2.
Geometric operations fill with the ImageNet mean colour (124, 116, 104) and resample bicubically.
Every draw comes from the caller's torch.Generator.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (124, 116, 104)  # round(255 * ImageNet mean): timm's default fill for geometric ops
RESAMPLE = Image.BICUBIC


def _signed(value: float, g: torch.Generator) -> float:
    return -value if torch.rand((), generator=g).item() < 0.5 else value


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=RESAMPLE, fillcolor=FILL)


def rotate(img, m, g):
    return img.rotate(_signed(m / MAX_LEVEL * 30.0, g), resample=RESAMPLE, fillcolor=FILL)


def shear_x(img, m, g):
    return _affine(img, (1, _signed(m / MAX_LEVEL * 0.3, g), 0, 0, 1, 0))


def shear_y(img, m, g):
    return _affine(img, (1, 0, 0, _signed(m / MAX_LEVEL * 0.3, g), 1, 0))


def translate_x(img, m, g):
    return _affine(img, (1, 0, _signed(m / MAX_LEVEL * 0.45, g) * img.width, 0, 1, 0))


def translate_y(img, m, g):
    return _affine(img, (1, 0, 0, 0, 1, _signed(m / MAX_LEVEL * 0.45, g) * img.height))


def _enhance(kind) -> Callable:
    def op(img, m, g):
        return kind(img).enhance(1.0 + _signed(m / MAX_LEVEL * 0.9, g))
    return op


def posterize(img, m, g):
    # Keeps the top `bits` bits; at magnitude 10 that is none (black), which Pillow's posterize refuses.
    bits = 4 - int(m / MAX_LEVEL * 4)
    mask = (0xFF << (8 - bits)) & 0xFF
    return img.point([v & mask for v in range(256)] * len(img.getbands()))


def solarize(img, m, g):
    return ImageOps.solarize(img, 256 - int(m / MAX_LEVEL * 256))


def solarize_add(img, m, g):
    add = int(m / MAX_LEVEL * 110)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


# The increasing-magnitude list (timm's _RAND_INCREASING_TRANSFORMS), in its order.
OPS: dict[str, Callable[[Image.Image, float, torch.Generator], Image.Image]] = {
    "AutoContrast": lambda img, m, g: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, g: ImageOps.equalize(img),
    "Invert": lambda img, m, g: ImageOps.invert(img),
    "Rotate": rotate,
    "PosterizeIncreasing": posterize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x,
    "TranslateYRel": translate_y,
}


@dataclass(frozen=True)
class RandAugment:
    magnitude: float
    num_ops: int = 2
    magnitude_std: float = 0.0
    prob: float = 0.5
    """Each drawn operation is applied with this probability (timm's AugmentOp prob in RandAugment)."""

    @classmethod
    def parse(cls, policy: str) -> "RandAugment | None":
        """'rand-m9-mstd0.5-inc1' -> RandAugment(9, 2, 0.5); '' or 'none' -> None."""
        if policy in ("", "none"):
            return None
        parts = policy.split("-")
        if parts[0] != "rand":
            raise ValueError(f"augmentation policy {policy!r}: only RandAugment ('rand-m9-mstd0.5-inc1') is "
                             f"implemented; set finetune.image.auto_augment to a 'rand-...' string or ''")
        fields = {"m": None, "n": 2.0, "mstd": 0.0, "inc": 0.0}
        for part in parts[1:]:
            found = re.fullmatch(r"(mstd|inc|m|n)([0-9.]+)", part)
            if not found:
                raise ValueError(f"augmentation policy {policy!r}: cannot read {part!r} (m, n, mstd, inc)")
            fields[found.group(1)] = float(found.group(2))
        if fields["m"] is None:
            raise ValueError(f"augmentation policy {policy!r} gives no magnitude (m9, say)")
        if fields["inc"] != 1:
            raise ValueError(f"augmentation policy {policy!r}: only the increasing-magnitude ops (inc1) are "
                             f"implemented, as the references use them")
        return cls(fields["m"], int(fields["n"]), fields["mstd"])

    def __call__(self, img: Image.Image, g: torch.Generator) -> Image.Image:
        names = list(OPS)
        for i in torch.randint(0, len(names), (self.num_ops,), generator=g).tolist():  # with replacement
            if torch.rand((), generator=g).item() >= self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = m + self.magnitude_std * torch.randn((), generator=g).item()
            img = OPS[names[i]](img, min(MAX_LEVEL, max(0.0, m)), g)
        return img
