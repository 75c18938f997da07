"""Linear probing of a frozen image encoder, the protocol of BEiT's `run_linear_eval.py` (microsoft/unilm
`beit/`; data2vec_vision is built on that code base), for the pretrained weights and for the same
architecture at random initialisation (README, fine-tuning).

The protocol, as in the reference:
* the encoder is frozen (evaluation mode: no dropout, no drop path);
* every block's output is read (`get_intermediate_layers`, before any final norm); a block's feature is
  its CLS output joined with the mean of its patch outputs (`--avgpool_patchtokens`; the mean alone
  for an encoder without a CLS token);
* one linear classifier per block (weights N(0, 0.01), bias 0), all trained together on the sum of
  their cross-entropies; no BatchNorm on the features (MAE's protocol has one; BEiT's does not);
* AdamW with weight decay 1e-4 (or SGD with momentum 0.9 and no weight decay) at lr 4e-3 (the BEiT
  README's linear-probe command) on a cosine annealed to 0 over the epochs, stepped once per epoch;
  100 epochs of batches of 1024 (128 on each of 8 GPUs);
* training images: random resized crop (area 0.08-1) and flip; evaluation: resize to 256/224 of the
  size and the centre crop (d2v.data.image_finetune);
* top-1 and top-5 per block; the best block is reported.

What differs: one process on one device (the reference spreads the batch over 8 GPUs with DDP; the
result is the same optimisation with the whole batch in one place); the crop resamples bicubically
(torchvision's RandomResizedCrop default is bilinear); the reported accuracy is the last epoch's, where
the reference prints the best over epochs measured on the validation set.

    python -m d2v.finetune.linear_eval --init CKPT --train-data DIR/train --eval-data DIR/val \\
        [--epochs 100 --batch-size 1024 --lr 4e-3 --optimizer adamw] [key=value overrides]
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(kw_only=True)
class LinearEvalConfig:
    epochs: int = 100
    batch_size: int = 1024
    lr: float = 4e-3
    optimizer: str = "adamw"
    """adamw (weight decay 1e-4) | sgd (momentum 0.9, no weight decay)."""
    seed: int = 0


class LayerFeatures:
    """Each block's output of a frozen encoder as (CLS ⊕ mean of patches), read with forward hooks."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        encoder = backbone.encoder
        self.blocks = [*encoder.prenet, *encoder.blocks]
        self.extra = encoder.num_extra_tokens
        self.width = backbone.embed_dim * (2 if self.extra else 1)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        outputs: list[Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out.x)) for b in self.blocks]
        try:
            self.backbone.eval()
            feats = self.backbone.features(images)
            self.backbone.encode(feats.x, feats.padding_mask)
        finally:
            for h in hooks:
                h.remove()
        e = self.extra
        return [torch.cat([x[:, 0], x[:, e:].mean(dim=1)], dim=-1).float() if e else x.mean(dim=1).float()
                for x in outputs]


class LayerwiseLinear(nn.Module):
    """One linear classifier per layer."""

    def __init__(self, num_layers: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_layers))
        for lin in self.linears:
            nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [lin(f) for lin, f in zip(self.linears, feats)]


def epoch_lr(lr: float, epoch: int, epochs: int) -> float:
    """CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once per epoch."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def make_optimizer(params, protocol: LinearEvalConfig) -> torch.optim.Optimizer:
    if protocol.optimizer == "sgd":
        return torch.optim.SGD(params, protocol.lr, momentum=0.9, weight_decay=0.0)
    if protocol.optimizer == "adamw":
        return torch.optim.AdamW(params, protocol.lr, weight_decay=1e-4)
    raise ValueError(f"linear eval optimizer {protocol.optimizer!r}: use adamw or sgd")


def _scores(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    from d2v.finetune.image_task import topk_correct

    return topk_correct(logits, labels, 1), topk_correct(logits, labels, 5)


def train_and_score(backbone: nn.Module, task, protocol: LinearEvalConfig) -> dict[str, Any]:
    """The protocol on one encoder; `task` is an image_cls task (its sources and transforms)."""
    from d2v.data.image_finetune import TrainTransform

    device = next(backbone.parameters()).device
    backbone.requires_grad_(False)
    layers = LayerFeatures(backbone)
    torch.manual_seed(protocol.seed)
    heads = LayerwiseLinear(len(layers.blocks), layers.width, task.num_outputs).to(device)
    opt = make_optimizer(heads.parameters(), protocol)
    m = task.cfg.model.image
    crop = TrainTransform(m.image_size, tuple(m.mean), tuple(m.std))
    source, labels = task.sources["train"], torch.as_tensor(task.targets["train"])
    for epoch in range(protocol.epochs):
        for group in opt.param_groups:
            group["lr"] = epoch_lr(protocol.lr, epoch, protocol.epochs)
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(protocol.seed * 1009 + epoch))
        for start in range(0, len(order), protocol.batch_size):
            idx = order[start:start + protocol.batch_size].tolist()
            feats = layers(source.train_batch(idx, crop, protocol.seed, epoch).to(device))
            loss = sum(F.cross_entropy(z, labels[idx].to(device)) for z in heads(feats))
            opt.zero_grad()
            loss.backward()
            opt.step()
    heads.eval()
    counts = np.zeros((len(layers.blocks), 2), dtype=np.int64)
    ev = task.sources["eval"]
    with torch.no_grad():
        for start in range(0, len(ev), 256):
            idx = list(range(start, min(start + 256, len(ev))))
            y = torch.as_tensor(task.targets["eval"][idx])
            for i, z in enumerate(heads(layers(ev.eval_batch(idx, task.eval_transform).to(device)))):
                counts[i] += _scores(z.cpu(), y)
    n = len(ev)
    rows = [{"layer": i + 1, "accuracy": float(c[0] / n), "top5": float(c[1] / n)} for i, c in enumerate(counts)]
    best = max(rows, key=lambda r: r["accuracy"])
    return {"layers": rows, "best_layer": best["layer"], "accuracy": best["accuracy"], "top5": best["top5"]}


def linear_eval(cfg, protocol: LinearEvalConfig) -> dict[str, Any]:
    """The pretrained encoder (when cfg.init is set) and a random one of the same shape."""
    from d2v.finetune.model import load_backbone
    from d2v.finetune.tasks import build_task

    task = build_task(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arms = {}
    for name, random_init in (("pretrained", False), ("random init", True)):
        if name == "pretrained" and not cfg.init:
            continue
        backbone = load_backbone(cfg.init, cfg.model, random_init=random_init, seed=cfg.train.seed).to(device)
        arms[name] = train_and_score(backbone, task, protocol)
    return {"init": cfg.init, "train_examples": task.size("train"), "eval_examples": task.size("eval"),
            "classes": len(task.labels), "protocol": asdict(protocol), "results": arms}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from d2v.finetune.resolve import resolve_finetune

    ap = argparse.ArgumentParser(prog="python -m d2v.finetune.linear_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default=None, help="d2v checkpoint or export directory")
    ap.add_argument("--preset", default=None, help="architecture when there is no --init (random only)")
    ap.add_argument("--train-data", required=True, help="ImageFolder root of the training images")
    ap.add_argument("--eval-data", required=True, help="ImageFolder root of the evaluation images")
    defaults = LinearEvalConfig()
    ap.add_argument("--epochs", type=int, default=defaults.epochs)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default=defaults.optimizer)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (model.image.*)")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise SystemExit("--epochs and --batch-size must be >= 1 and --lr > 0")
    # The evaluation crop of the protocol: resize to 256/224 of the size, keep the centre.
    overrides = [f"finetune.train_data={args.train_data}", f"finetune.eval_data={args.eval_data}",
                 f"finetune.image.crop_pct={224 / 256}"]
    cfg, _ = resolve_finetune("image_cls", init=args.init, preset=args.preset, overrides=overrides + args.overrides)
    protocol = LinearEvalConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                optimizer=args.optimizer, seed=args.seed)
    result = linear_eval(cfg, protocol)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"linear probe (BEiT protocol, {args.epochs} epochs): {result['train_examples']} train / "
              f"{result['eval_examples']} eval images, {result['classes']} classes")
        print("| encoder | best block | top-1 | top-5 |\n|---|---|---|---|")
        for name, r in result["results"].items():
            print(f"| {name} | {r['best_layer']} | {r['accuracy']:.1%} | {r['top5']:.1%} |")
    return result


if __name__ == "__main__":
    main()
