"""Layer-wise learning-rate decay and per-block drop path for fine-tuning a ViT (BEiT's optim_factory,
used by data2vec_vision; fairseq's `mae_image_classification.py` for data2vec 2.0).

Layer ids over the L blocks (prenet and main, in order): the embeddings (patch projection, CLS token,
input LayerNorm) are layer 0, block i is layer i + 1, everything after the blocks (final norm, pooled
LayerNorm, classifier) and BEiT's shared relative position bias are layer L + 1. A parameter of layer
l trains at lr · decay^(L + 1 - l): the head at the full rate, block i at decay^(L - i).

data2vec 2.0's recipe scales the blocks only: its embeddings keep the full rate (`embeddings_decay`
False), as fairseq's d2v_multi branch sets lr_scale on the blocks and nothing else.
"""
from __future__ import annotations

from typing import Any

from torch import nn


def layer_id(name: str, num_prenet: int, num_blocks: int) -> int:
    """The layer of a FinetuneModel parameter name (backbone.encoder.blocks.3.ffn.fc1.weight -> 4 + num_prenet)."""
    parts = name.split(".")
    if parts[0] == "backbone":
        if parts[1] == "frontend":
            return 0
        if parts[1] == "encoder":
            part = parts[2]
            if part in ("cls_token", "layer_norm", "sincos", "pos_conv"):
                return 0
            if part == "prenet":
                return int(parts[3]) + 1
            if part == "blocks":
                return num_prenet + int(parts[3]) + 1
    return num_blocks + 1


def lr_scales(num_blocks: int, decay: float, embeddings_decay: bool = True) -> list[float]:
    """The LR multiplier of each layer id 0 .. L + 1."""
    scales = [decay ** (num_blocks + 1 - i) for i in range(num_blocks + 2)]
    if not embeddings_decay:
        scales[0] = 1.0
    return scales


def layer_decay_groups(model: nn.Module, *, lr: float, weight_decay: float, decay: float,
                       embeddings_decay: bool) -> list[dict[str, Any]]:
    """Optimizer parameter groups, one per (layer, weight decay or not), each with its own LR.
    Weight decay spares 1-D parameters and the ones the model factory marked (BEiT's CLS token)."""
    from d2v.train.trainer import param_group_names

    encoder = model.backbone.encoder
    npre, L = len(encoder.prenet), len(encoder.prenet) + len(encoder.blocks)
    scales = lr_scales(L, decay, embeddings_decay)
    params = dict(model.named_parameters())
    decayed, exempt = param_group_names(model, no_decay_1d=True)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for names, wd in ((decayed, weight_decay), (exempt, 0.0)):
        for n in names:
            lid = layer_id(n, npre, L)
            group = groups.setdefault((lid, wd == 0.0), {"params": [], "weight_decay": wd, "lr": lr * scales[lid],
                                                         "lr_scale": scales[lid], "layer": lid})
            group["params"].append(params[n])
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]  # the head's full LR first: the one logged


def set_drop_path(model: nn.Module, rate: float) -> list[float]:
    """Drop path rising linearly from 0 at the first block (prenet included) to `rate` at the last
    (np.linspace in both references). Returns the rates set."""
    encoder = model.backbone.encoder
    blocks = [*encoder.prenet, *encoder.blocks]
    rates = [rate * i / max(len(blocks) - 1, 1) for i in range(len(blocks))]
    for block, r in zip(blocks, rates):
        block.drop_path = r
    return rates
