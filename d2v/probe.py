"""`python -m d2v probe CHECKPOINT --data 'SHARDS' --val-data 'SHARDS'`: a linear probe of frozen
features for labelled images: logistic regression on mean-pooled student
encoder outputs, for the pretrained checkpoint and for the same architecture at random
initialisation, side by side. Reports accuracy; it does not assume that pretraining wins.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np
import torch


def read_labelled_images(pattern: str, size: int, mean, std) -> tuple[torch.Tensor, np.ndarray]:
    """All images of the shards (resized, normalised, no augmentation) and their class indices."""
    import webdataset as wds

    from d2v.data.image import ImageTransform, decode_image
    from d2v.data.shards import expand_pattern

    transform = ImageTransform(size, mean, std, train=False)
    images, labels = [], []
    for sample in wds.WebDataset(expand_pattern(pattern), shardshuffle=False, empty_check=False):
        images.append(transform(decode_image(sample), torch.Generator()))
        labels.append(int(sample["cls"]))
    if not images:
        raise ValueError(f"{pattern}: no images")
    return torch.stack(images), np.array(labels)


@torch.no_grad()
def features(model, images: torch.Tensor, batch: int = 128) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        feats = model.features(x)
        h = model.encode(feats.x, feats.padding_mask)  # no mask: the whole image
        out.append(h.mean(dim=1).float().numpy())
    return np.concatenate(out)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(val_x)) == val_y).mean())


def load_student(path: str):
    """A student from an export directory or a checkpoint (run dir, checkpoints dir or tag)."""
    from d2v.export import load_exported, resolve_tag_dir, student_fp32

    if os.path.exists(os.path.join(path, "student.safetensors")):
        student, _, cfg = load_exported(path)
        return student, cfg
    from d2v.config import from_dict
    from d2v.models import build_model

    tag_dir = resolve_tag_dir(path)
    with open(os.path.join(tag_dir, "d2v_state.json")) as f:
        cfg = from_dict(json.load(f)["config"])
    student = build_model(cfg)
    student.load_state_dict(student_fp32(tag_dir, cfg), strict=True)
    return student, cfg


def probe(checkpoint: str, data: str, val_data: str, *, seed: int = 0) -> dict[str, Any]:
    from d2v.models import build_model

    torch.manual_seed(seed)
    student, cfg = load_student(checkpoint)
    im = cfg.model.image
    train_x, train_y = read_labelled_images(data, im.image_size, im.mean, im.std)
    val_x, val_y = read_labelled_images(val_data, im.image_size, im.mean, im.std)
    torch.manual_seed(seed)
    random_model = build_model(cfg)
    rows = {}
    for name, model in (("pretrained", student), ("random init", random_model)):
        rows[name] = fit_probe(features(model, train_x), train_y, features(model, val_x), val_y)
    return {"checkpoint": checkpoint, "train_images": len(train_y), "val_images": len(val_y),
            "classes": int(len(np.unique(train_y))), "accuracy": rows}


def accuracy_table(accuracy: dict[str, float]) -> str:
    """Markdown: one row per encoder (pretrained, random init)."""
    return "\n".join(["| encoder | accuracy |", "|---|---|", *(f"| {k} | {v:.1%} |" for k, v in accuracy.items())])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m d2v probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="export directory, run directory or checkpoint tag directory")
    ap.add_argument("--data", required=True, help="labelled training shards (brace pattern)")
    ap.add_argument("--val-data", required=True, help="labelled evaluation shards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = probe(args.checkpoint, args.data, args.val_data, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"linear probe: {result['train_images']} train / {result['val_images']} eval images, "
              f"{result['classes']} classes")
        print(accuracy_table(result["accuracy"]))
    return result
