"""Image decoding, augmentation and collation for vision pretraining, with Pillow and torch only
(torchvision is not installable beside torch 2.13 CPU).

data2vec 1.0 follows BEiT's `DataAugmentationForBEiT` (data2vec_vision `beit/datasets.py`): colour
jitter (brightness, contrast, saturation 0.4, in random order), horizontal flip, then a random resized
crop with area fraction in (0.08, 1). data2vec 2.0 follows MAE (fairseq `examples/data2vec/data/
mae_image_dataset.py`): random resized crop with area fraction in (0.2, 1), flip, no jitter. The crop
draws the aspect ratio log-uniform in `ratio`, 10 tries, then a centre crop. Every random draw comes
from a torch.Generator the loader seeds from (seed, epoch, rank, worker, position), so a batch is a
function of its position. BEiT block masks are made here, in the collate step.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageEnhance

from d2v.batch import Batch


def decode_image(sample: dict) -> Image.Image:
    """RGB PIL image from a shard sample's jpg/png bytes; raises on corrupt data."""
    for ext in ("jpg", "jpeg", "png"):
        if ext in sample:
            im = Image.open(io.BytesIO(sample[ext]))
            im.load()
            return im.convert("RGB")
    raise KeyError(f"sample {sample.get('__key__')} has no jpg/png field (fields: {sorted(sample)})")


def random_resized_crop_box(width: int, height: int, g: torch.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop with area fraction in `scale` and aspect ratio in `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item())
        aspect = math.exp(log_lo + (log_hi - log_lo) * torch.rand((), generator=g).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            return left, top, w, h
    side = min(width, height)  # fallback: the largest centred square
    return (width - side) // 2, (height - side) // 2, side, side


# Pillow's enhancers behind torchvision's ColorJitter on PIL images: brightness blends with black,
# contrast with the mean grey level, saturation with the greyscale image.
_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def color_jitter(image: Image.Image, strength: float, g: torch.Generator) -> Image.Image:
    """Brightness, contrast and saturation, each by a factor uniform in [1 - s, 1 + s], in random order."""
    if strength <= 0:
        return image
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    for i in torch.randperm(len(_ENHANCERS), generator=g).tolist():
        factor = lo + (hi - lo) * torch.rand((), generator=g).item()
        image = _ENHANCERS[i](image).enhance(factor)
    return image


class ImageTransform:
    def __init__(self, size: int, mean, std, *, scale=(0.08, 1.0), color_jitter: float = 0.0,
                 train: bool = True) -> None:
        self.size, self.scale, self.jitter, self.train = size, tuple(scale), color_jitter, train
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, g: torch.Generator) -> torch.Tensor:
        if self.train:
            # Jitter first, over the whole image (contrast blends with its mean grey), as BEiT does; the
            # flip before or after the crop gives the same distribution.
            image = color_jitter(image, self.jitter, g)
            left, top, w, h = random_resized_crop_box(image.width, image.height, g, self.scale)
            image = image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
            if torch.rand((), generator=g).item() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = image.resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std


def image_collate(images: list[torch.Tensor], labels: list[int], keys: list[str], *, masks, num_patches: int,
                  g: torch.Generator) -> Batch:
    """masks: the run's mask maker (d2v.masking.makers), over the `num_patches` patches of an image."""
    mask = masks(len(images), num_patches, None, g)
    return Batch(source=torch.stack(images), mask=mask, keys=keys, extras={"labels": torch.tensor(labels)})


class ImageBatchMaker:
    """The loader's BatchMaker for image shards (d2v.data.loader): decode, augment, collate, mask.
    An image that cannot be decoded is counted as `corrupt` and left out of its batch."""

    def __init__(self, transform: ImageTransform, collate) -> None:
        # collate(images, labels, keys, generator) -> Batch: the masking the run configured
        self.transform, self.collate = transform, collate

    def __call__(self, raw: list[tuple[str, dict[str, bytes]]], generator: torch.Generator,
                 stats: dict[str, int]) -> Batch | None:
        images, labels, keys = [], [], []
        for key, fields in raw:
            try:
                image = self.transform(decode_image(fields), generator)
                label = int(fields.get("cls", b"-1"))
            except Exception:  # noqa: BLE001 - Pillow raises many types for damaged files
                stats["corrupt"] = stats.get("corrupt", 0) + 1
                continue
            images.append(image)
            labels.append(label)
            keys.append(key)
        return self.collate(images, labels, keys, generator) if images else None

    def filler(self, generator: torch.Generator) -> Batch:
        size = self.transform.size
        return self.collate([torch.zeros(3, size, size)], [-1], ["<filler>"], generator)
