"""ImageFolder-style trees (ROOT/CLASS/*.png|jpg) for image classification, and the digits demo
written as one (README, fine-tuning).

`read_imagefolder` loads every image of every class folder (sorted; label = index of the class
name in the sorted list, or in `classes` when given so that an evaluation tree uses the training
tree's labels). Anything it cannot use is an error naming the path: a missing root, no class
folders, an empty class, a file that is not an image, an unreadable image, a class the training
tree does not have.

`python -m d2v.data.imagefolder OUT` writes the scikit-learn digits, rendered exactly as the image
pretraining demo renders them (8x8 grey -> 32x32 bicubic RGB), as OUT/train/<digit>/ and
OUT/val/<digit>/ with a fixed, stratified split.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_imagefolder(root: str, classes: Sequence[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """(image paths, label indices, class names) of a tree, in sorted order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not found:
        raise ValueError(f"{root} has no class folders; expected {root}/<class>/<image> (ImageFolder layout)")
    strays = sorted(f for f in os.listdir(root) if os.path.isfile(os.path.join(root, f)) and not f.startswith("."))
    if strays:
        raise ValueError(f"{root} holds files outside class folders ({strays[:3]}); move them into a class folder")
    names = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{root}: classes {unknown} are not among the training classes {names}")
    paths, labels = [], []
    for name in found:
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
        if not files:
            raise ValueError(f"class folder {folder} is empty; remove it or add images")
        for f in files:
            if not f.lower().endswith(IMAGE_SUFFIXES):
                raise ValueError(f"{os.path.join(folder, f)} is not an image ({', '.join(IMAGE_SUFFIXES)}); remove it")
            paths.append(os.path.join(folder, f))
            labels.append(names.index(name))
    return paths, labels, names


def read_imagefolder(root: str, size: int, mean: Sequence[float], std: Sequence[float], *,
                     classes: Sequence[str] | None = None) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(N×3×size×size normalised images, N labels, class names); images are resized, not cropped."""
    from PIL import Image

    from d2v.data.image import ImageTransform

    paths, labels, names = list_imagefolder(root, classes)
    transform = ImageTransform(size, mean, std, train=False)
    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                rgb = im.convert("RGB")
        except Exception as err:  # PIL raises several types for broken files
            raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err}); remove or replace it") from None
        images.append(transform(rgb, torch.Generator()))
    return torch.stack(images), np.array(labels, dtype=np.int64), names


def render_digit(image_8x8: np.ndarray, size: int = 32):
    """The pretraining demo's rendering (d2v.data.demo_image): 0-16 grey levels -> RGB PIL image."""
    from PIL import Image

    grey = (image_8x8 / 16.0 * 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")


def export_digits(out: str, *, val_fraction: float = 0.2, size: int = 32, seed: int = 0) -> dict[str, int]:
    """Writes OUT/{train,val}/<digit>/digitNNNNN.png; every class is split in the same proportion."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        n_val = int(round(len(idx) * val_fraction))
        val = set(rng.permutation(idx)[:n_val].tolist())
        for i in idx.tolist():
            split = "val" if i in val else "train"
            folder = os.path.join(out, split, str(label))
            os.makedirs(folder, exist_ok=True)
            # The file name keeps the demo's index: the same image has the same name in both trees.
            render_digit(digits.images[i], size).save(os.path.join(folder, f"digit{i:05d}.png"))
            counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(prog="python -m d2v.data.imagefolder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    counts = export_digits(args.out, val_fraction=args.val_fraction, seed=args.seed)
    print(f"digits: {counts['train']} train / {counts['val']} val images under {args.out}/{{train,val}}/<digit>/")
    return counts


if __name__ == "__main__":
    main()
