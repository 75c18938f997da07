"""Built-in image demo data, no download: the handwritten digits and the two
photographs that scikit-learn ships.

* digits: 1,797 8x8 grey images of the classes 0-9, upsampled to 32x32 RGB (the class folders the
  linear probe reads);
* photo: random 32x32 crops (after random downscaling) of the two photographs, a natural-image
  class that gives pretraining texture and colour.

Written as an ImageNet-style tree, then through `prepare_image` into shards. Deterministic.
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def write_tree(root: str, *, size: int = 32, photo_crops: int = 600, seed: int = 0) -> str:
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        d = os.path.join(root, str(int(label)))
        os.makedirs(d, exist_ok=True)
        grey = (img / 16.0 * 255).astype(np.uint8)
        im = Image.fromarray(grey, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        im.save(os.path.join(d, f"digit{i:05d}.png"))
    photos = load_sample_images().images
    d = os.path.join(root, "photo")
    os.makedirs(d, exist_ok=True)
    for i in range(photo_crops):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.08, 0.5)
        h, w = photo.shape[:2]
        ch, cw = int(h * scale), int(w * scale)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((size, size), Image.BICUBIC)
        crop.save(os.path.join(d, f"photo{i:05d}.jpg"), quality=92)
    return root


def build_image_demo(out: str, *, seed: int = 0, samples_per_shard: int = 300) -> dict:
    from d2v.data.prepare_image import prepare_image

    tree = write_tree(os.path.join(out, "tree"), seed=seed)
    return prepare_image(tree, os.path.join(out, "shards"), clean=True, samples_per_shard=samples_per_shard, seed=seed)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m d2v.data.demo image", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    report = build_image_demo(args.out, seed=args.seed)
    for name, pattern in report["patterns"].items():
        print(f"{name}: {pattern} ({report['samples'][name]} images)")
    return report
