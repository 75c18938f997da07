"""`python -m d2v.finetune.probe --task image_cls|text_cls --init CKPT --train-data ... --eval-data ...`:
a linear probe of frozen encoder features on the fine-tuning data (README, fine-tuning).

Features are the encoder outputs averaged over the real positions (the fine-tuning head's
pooling), computed in fp32 without masking; `d2v.probe.fit_probe` fits a logistic regression on
standardised features. Runs for the pretrained weights and for the same architecture at random
initialisation; one process, no DeepSpeed.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from d2v.finetune.config import FinetuneConfig, resolve_finetune
from d2v.finetune.model import load_backbone, masked_mean
from d2v.finetune.tasks import ClassificationTask, build_task
from d2v.probe import accuracy_table


@torch.no_grad()
def pooled_features(backbone, task: ClassificationTask, split: str, batch: int = 64) -> np.ndarray:
    backbone.eval()
    out = []
    for start in range(0, task.size(split), batch):
        b = task.batch(split, range(start, min(start + batch, task.size(split))))
        feats = backbone.features(b.source)
        out.append(masked_mean(backbone.encode(feats.x, feats.padding_mask), feats.padding_mask).float().numpy())
    return np.concatenate(out)


def probe(cfg: FinetuneConfig) -> dict[str, Any]:
    """Accuracy of the probe for the pretrained encoder and for a random one of the same shape."""
    from d2v.probe import fit_probe

    if cfg.task not in ("image_cls", "text_cls"):
        raise ValueError(f"the linear probe is for classification (image_cls, text_cls), not {cfg.task}")
    task = build_task(cfg)
    accuracy = {}
    for name, random_init in (("pretrained", False), ("random init", True)):
        if name == "pretrained" and not cfg.init:
            continue
        backbone = load_backbone(cfg.init, cfg.model, random_init=random_init, seed=cfg.train.seed)
        accuracy[name] = fit_probe(pooled_features(backbone, task, "train"), task.targets["train"],
                                   pooled_features(backbone, task, "eval"), task.targets["eval"])
    return {"task": cfg.task, "init": cfg.init, "train_examples": task.size("train"),
            "eval_examples": task.size("eval"), "classes": len(task.labels), "accuracy": accuracy}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m d2v.finetune.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=["image_cls", "text_cls"])
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
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"linear probe ({args.task}): {result['train_examples']} train / {result['eval_examples']} eval, "
              f"{result['classes']} classes")
        print(accuracy_table(result["accuracy"]))
    return result


if __name__ == "__main__":
    main()
