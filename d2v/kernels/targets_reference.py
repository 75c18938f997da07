"""Plain PyTorch reference of the streaming target form (docs/method.md §5).

Legend: B batch, T time, D width. `kernels` may not import `d2v`, so the semantics are restated
here: norms are parameter-free and computed in fp32 with eps 1e-5; "instance" normalises each
(sample, channel) over time with padded frames left out of the statistics; "layer" normalises
each position over channels; None is the identity. Padded positions of every result are 0.

`normalize(x, norm, padding_mask, scale)` is the one primitive: it returns the fp32 norm of
`x * scale`. accumulate is `acc += normalize(x)`; finalize is `normalize(acc, scale=1/top_k)`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5
NORMS = ("instance", "layer", None)


def check_norm(norm: str | None) -> None:
    if norm not in NORMS:
        raise ValueError(f"target norm must be one of {NORMS}, got {norm!r}")


def normalize(x_BTD: Tensor, norm: str | None, padding_mask: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """fp32 B×T×D: the `norm` of `x_BTD * scale`, padded positions (mask True) zeroed. New tensor."""
    check_norm(norm)
    x = x_BTD.float()
    if scale != 1.0:
        x = x * scale
    elif norm is None and padding_mask is None and x.data_ptr() == x_BTD.data_ptr():
        x = x.clone()  # the result is always a fresh tensor (custom ops may not alias inputs)
    if norm == "instance":
        if padding_mask is None:
            # F.instance_norm wants B×D×T: normalising along T means transposing first.
            return F.instance_norm(x.transpose(1, 2), eps=EPS).transpose(1, 2).contiguous()
        valid = (~padding_mask).unsqueeze(-1).float()  # B×T×1
        count = valid.sum(dim=1, keepdim=True).clamp_min(1.0)  # B×1×1; empty sample → zeros
        mean = (x * valid).sum(dim=1, keepdim=True) / count
        var = (((x - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
        return (x - mean) * torch.rsqrt(var + EPS) * valid
    if norm == "layer":
        x = F.layer_norm(x, x.shape[-1:], eps=EPS)
    return x if padding_mask is None else x.masked_fill(padding_mask.unsqueeze(-1), 0.0)


def accumulate(acc: Tensor | None, layer_output: Tensor, *, layer_norm: str | None,
               padding_mask: Tensor | None = None) -> Tensor:
    """acc (fp32 B×T×D) += normalize(layer_output); allocated when None. Returns acc."""
    y = normalize(layer_output, layer_norm, padding_mask)
    return y if acc is None else acc.add_(y)


def finalize(acc: Tensor, *, top_k: int, final_norm: str | None, padding_mask: Tensor | None = None) -> Tensor:
    """The target: final norm of acc / top_k, fp32 B×T×D. acc itself is left unchanged."""
    return normalize(acc, final_norm, padding_mask, scale=1.0 / top_k)


def fused_targets(layer_outputs: Sequence[Tensor], *, top_k: int, layer_norm: str | None,
                  final_norm: str | None, padding_mask: Tensor | None = None) -> Tensor:
    """The list form: the top_k last layer outputs, each normalised, averaged, normalised again."""
    if not 1 <= top_k <= len(layer_outputs):
        raise ValueError(f"top_k={top_k} but {len(layer_outputs)} layer outputs were given")
    acc = None
    for a in layer_outputs[-top_k:]:
        acc = accumulate(acc, a, layer_norm=layer_norm, padding_mask=padding_mask)
    return finalize(acc, top_k=top_k, final_norm=final_norm, padding_mask=padding_mask)
