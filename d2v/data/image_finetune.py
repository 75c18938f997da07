"""Images for classification fine-tuning: the reference's training and evaluation transforms, and an
ImageFolder read per batch (README, fine-tuning).

Training (timm's `create_transform(is_training=True)` as data2vec_vision's BEiT fine-tuning and
fairseq's `mae_finetuning_image_dataset.py` call it): random resized crop (area 0.08-1, aspect
3/4-4/3, bicubic) to the model's size, horizontal flip with probability 1/2, RandAugment
(d2v.data.randaugment; no colour jitter beside it, as timm skips jitter when RandAugment is on),
normalisation, then random erasing of one rectangle (area 0.02-1/3 of the image, aspect 0.3-3.3)
with per-pixel N(0, 1) values ("pixel" mode) with probability `erase_prob`.

Evaluation: the shorter side resized to int(size / crop_pct) (bicubic), the centre size×size crop,
normalisation. timm and torchvision place the crop at round((H - size) / 2).

Images are decoded when a batch asks for them: an ImageNet-sized tree is never held in memory. Each
training example's random draws come from a generator seeded by (seed, key, index): the caller
passes the update step as the key, so a batch is the same after a resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from d2v.data.image import random_resized_crop_box
from d2v.data.imagefolder import list_imagefolder
from d2v.data.randaugment import RandAugment


def example_generator(seed: int, key: int, index: int) -> torch.Generator:
    """The generator of one example's augmentation draws."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + key) * 10_000_019 + index) % 2**63)


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def resize_shorter(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side `size` and the longer one int(size · long / short) (torchvision's Resize)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred size×size crop."""
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def random_erase(x: torch.Tensor, g: torch.Generator, *, area=(0.02, 1 / 3), aspect=0.3) -> torch.Tensor:
    """One rectangle of C×H×W `x` replaced by N(0, 1) noise (timm's RandomErasing, mode 'pixel', one
    count); 10 tries to fit it, else the image is returned unchanged."""
    C, H, W = x.shape
    log_lo, log_hi = math.log(aspect), math.log(1 / aspect)
    for _ in range(10):
        target = H * W * (area[0] + (area[1] - area[0]) * torch.rand((), generator=g).item())
        ratio = math.exp(log_lo + (log_hi - log_lo) * torch.rand((), generator=g).item())
        h, w = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if w < W and h < H:
            top = int(torch.randint(0, H - h + 1, (), generator=g))
            left = int(torch.randint(0, W - w + 1, (), generator=g))
            x = x.clone()
            x[:, top:top + h, left:left + w] = torch.randn((C, h, w), generator=g)
            return x
    return x


@dataclass(frozen=True)
class TrainTransform:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    randaugment: RandAugment | None = None
    erase_prob: float = 0.0
    scale: tuple[float, float] | None = (0.08, 1.0)
    """Area fraction of the random resized crop (then a flip); None: the whole image resized, no flip."""

    def __call__(self, image: Image.Image, g: torch.Generator) -> torch.Tensor:
        if self.scale is None:
            image = image.resize((self.size, self.size), Image.BICUBIC)
        else:
            left, top, w, h = random_resized_crop_box(image.width, image.height, g, self.scale)
            image = image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
            if torch.rand((), generator=g).item() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            image = self.randaugment(image, g)
        x = to_tensor(image, self.mean, self.std)
        if self.erase_prob > 0 and torch.rand((), generator=g).item() < self.erase_prob:
            x = random_erase(x, g)
        return x


@dataclass(frozen=True)
class EvalTransform:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 224 / 256

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.resize(resize_shorter(image.width, image.height, int(self.size / self.crop_pct)), Image.BICUBIC)
        return to_tensor(image.crop(center_crop_box(image.width, image.height, self.size)), self.mean, self.std)


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as err:  # PIL raises several types for broken files
        raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err}); remove or replace it") from None


class ImageFolderSource:
    """The paths and labels of an ImageFolder tree (ROOT/CLASS/IMAGE); images are decoded per batch."""

    def __init__(self, root: str, classes: Sequence[str] | None = None) -> None:
        self.root = root
        self.paths, labels, self.classes = list_imagefolder(root, classes)
        self.labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def train_batch(self, indices: Sequence[int], transform: TrainTransform, seed: int, key: int) -> torch.Tensor:
        return torch.stack([transform(load_rgb(self.paths[i]), example_generator(seed, key, i)) for i in indices])

    def eval_batch(self, indices: Sequence[int], transform: EvalTransform) -> torch.Tensor:
        return torch.stack([transform(load_rgb(self.paths[i])) for i in indices])
