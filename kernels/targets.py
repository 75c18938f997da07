"""Placeholder until the fused Triton target kernels land: plain PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _norm(x: Tensor, kind, pad):
    x = x.float()
    if kind == "instance":
        if pad is None:
            return F.instance_norm(x.transpose(1, 2), eps=1e-5).transpose(1, 2)
        v = (~pad).unsqueeze(-1).float()
        n = v.sum(1, keepdim=True).clamp_min(1)
        m = (x * v).sum(1, keepdim=True) / n
        var = (((x - m) * v) ** 2).sum(1, keepdim=True) / n
        return (x - m) * torch.rsqrt(var + 1e-5) * v
    if kind == "layer":
        x = F.layer_norm(x, x.shape[-1:], eps=1e-5)
    return x if pad is None else x.masked_fill(pad.unsqueeze(-1), 0.0)


def accumulate(acc, layer_output, *, layer_norm, padding_mask=None):
    y = _norm(layer_output, layer_norm, padding_mask)
    return y.clone() if acc is None else acc.add_(y)


def finalize(acc, *, top_k, final_norm, padding_mask=None):
    return _norm(acc.div_(top_k), final_norm, padding_mask)


def fused_targets(layer_outputs, *, top_k, layer_norm, final_norm, padding_mask=None):
    acc = None
    for a in layer_outputs[-top_k:]:
        acc = accumulate(acc, a, layer_norm=layer_norm, padding_mask=padding_mask)
    return finalize(acc, top_k=top_k, final_norm=final_norm, padding_mask=padding_mask)
