"""Linear probes of frozen encoder features: a logistic regression on standardised features,
for the pretrained weights and for the same architecture at random initialisation, side by side.
It reports accuracy; it does not assume that pretraining wins. One process, no DeepSpeed.

Features are the encoder outputs averaged over the real positions (the fine-tuning head's
pooling), computed in fp32 without masking. Two ways in:

    python -m d2v probe CHECKPOINT --data 'SHARDS' --val-data 'SHARDS'
        labelled pretraining image shards (their `cls` entries), resized without augmentation;
    python -m d2v.finetune.probe --task image_cls|text_cls --init CKPT --train-data ... --eval-data ...
        the fine-tuning data of a classification task (README, fine-tuning).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Iterable

import numpy as np
import torch

from d2v.finetune.model import masked_mean


@torch.no_grad()
def pooled_features(model, sources: Iterable[torch.Tensor]) -> np.ndarray:
    """N×D: each batch through the feature encoder and the encoder, averaged over real positions."""
    model.eval()
    out = []
    for source in sources:
        feats = model.features(source)
        out.append(masked_mean(model.encode(feats.x, feats.padding_mask), feats.padding_mask).float().numpy())
    return np.concatenate(out)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(val_x)) == val_y).mean())


def accuracy_table(accuracy: dict[str, float]) -> str:
    """Markdown: one row per encoder (pretrained, random init)."""
    return "\n".join(["| encoder | accuracy |", "|---|---|", *(f"| {k} | {v:.1%} |" for k, v in accuracy.items())])


def _report(result: dict[str, Any], as_json: bool, headline: str) -> dict[str, Any]:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(headline)
        print(accuracy_table(result["accuracy"]))
    return result


# -- labelled pretraining shards ------------------------------------------------------------------

def read_labelled_images(pattern: str, size: int, mean, std) -> tuple[torch.Tensor, np.ndarray]:
    """All images of the shards (resized, normalised, no augmentation) and their class indices."""
    from d2v.data.image import ImageTransform, decode_image
    from d2v.data.shards import expand_pattern, iter_samples

    transform = ImageTransform(size, mean, std, train=False)
    images, labels = [], []
    for _, sample in (s for path in expand_pattern(pattern) for s in iter_samples(path)):
        images.append(transform(decode_image(sample), torch.Generator()))
        labels.append(int(sample["cls"]))
    if not images:
        raise ValueError(f"{pattern}: no images")
    return torch.stack(images), np.array(labels)


def _in_batches(x: torch.Tensor, size: int = 128) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def probe_shards(checkpoint: str, data: str, val_data: str, *, seed: int = 0) -> dict[str, Any]:
    from d2v.export import load_student
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
        rows[name] = fit_probe(pooled_features(model, _in_batches(train_x)), train_y,
                               pooled_features(model, _in_batches(val_x)), val_y)
    return {"checkpoint": checkpoint, "train_images": len(train_y), "val_images": len(val_y),
            "classes": int(len(np.unique(train_y))), "accuracy": rows}


def main_shards(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m d2v probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="export directory, run directory or checkpoint tag directory")
    ap.add_argument("--data", required=True, help="labelled training shards (brace pattern)")
    ap.add_argument("--val-data", required=True, help="labelled evaluation shards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = probe_shards(args.checkpoint, args.data, args.val_data, seed=args.seed)
    return _report(result, args.json, f"linear probe: {result['train_images']} train / {result['val_images']} "
                                      f"eval images, {result['classes']} classes")


# -- the fine-tuning data of a classification task --------------------------------------------------

def probe(cfg) -> dict[str, Any]:
    """Accuracy of the probe for the pretrained encoder and for a random one of the same shape
    (cfg: a d2v.finetune.config.FinetuneConfig)."""
    from d2v.finetune.model import load_backbone
    from d2v.finetune.tasks import TASKS, build_task

    if not TASKS[cfg.task].probe:
        raise ValueError(f"the linear probe is for single-label classification "
                         f"({', '.join(n for n, c in sorted(TASKS.items()) if c.probe)}), not {cfg.task}")
    task = build_task(cfg)

    def sources(split: str, batch: int = 64):
        for start in range(0, task.size(split), batch):
            yield task.batch(split, range(start, min(start + batch, task.size(split)))).source

    accuracy = {}
    for name, random_init in (("pretrained", False), ("random init", True)):
        if name == "pretrained" and not cfg.init:
            continue
        backbone = load_backbone(cfg.init, cfg.model, random_init=random_init, seed=cfg.train.seed)
        accuracy[name] = fit_probe(pooled_features(backbone, sources("train")), task.targets["train"],
                                   pooled_features(backbone, sources("eval")), task.targets["eval"])
    return {"task": cfg.task, "init": cfg.init, "train_examples": task.size("train"),
            "eval_examples": task.size("eval"), "classes": len(task.labels), "accuracy": accuracy}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from d2v.finetune.resolve import resolve_finetune

    ap = argparse.ArgumentParser(prog="python -m d2v.finetune.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from d2v.finetune.tasks import TASKS

    ap.add_argument("--task", required=True, choices=sorted(n for n, c in TASKS.items() if c.probe))
    ap.add_argument("--init", default=None, help="d2v checkpoint or export directory")
    ap.add_argument("--preset", default=None, help="architecture when there is no --init (random only)")
    ap.add_argument("--train-data", required=True)
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    overrides = [f"finetune.train_data={args.train_data}", f"finetune.eval_data={args.eval_data}"]
    if args.tokenizer:
        overrides.append(f"finetune.tokenizer={args.tokenizer}")
    cfg, _ = resolve_finetune(args.task, init=args.init, preset=args.preset, overrides=overrides + args.overrides)
    torch.manual_seed(cfg.train.seed)
    result = probe(cfg)
    return _report(result, args.json, f"linear probe ({args.task}): {result['train_examples']} train / "
                                      f"{result['eval_examples']} eval, {result['classes']} classes")


if __name__ == "__main__":
    main()
