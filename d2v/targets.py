"""Teacher targets: y = N_post(mean over the top-K blocks of N_pre(a_l))  (docs/method.md §3.1, §5).

Norms are parameter-free and computed in fp32:
* ``"instance"``: per sample and channel over time (B×T×D is normalised along T), padded
  frames excluded from the statistics (the reference included them; with no padding the two
  agree);
* ``"layer"``: per position over channels;
* ``None``: identity.
Padded positions of every result are 0 (they are never regressed).

Two forms with identical results: the list form `build_targets` (the reference, used by tests)
and the streaming form `accumulate`/`finalize`, which the teacher calls after each of its
top-K blocks so it never holds K layer outputs. `kernels.fused_targets`, `kernels.accumulate`
and `kernels.finalize` are the fused GPU versions of these.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5
NORMS = ("instance", "layer", None)


def _check_norm(norm: str | None) -> None:
    if norm not in NORMS:
        raise ValueError(f"target norm must be one of {NORMS}, got {norm!r}")


def instance_norm(x_BTD: Tensor, padding_mask: Tensor | None = None, eps: float = EPS) -> Tensor:
    """Normalises each (sample, channel) over time, ignoring padded frames. fp32 out."""
    x = x_BTD.float()
    if padding_mask is None:
        # F.instance_norm wants B×C×T: the transpose is the classic bug, so keep it explicit.
        return F.instance_norm(x.transpose(1, 2), eps=eps).transpose(1, 2)
    valid = (~padding_mask).unsqueeze(-1).to(x.dtype)  # B×T×1
    count = valid.sum(dim=1, keepdim=True).clamp_min(1.0)  # B×1×1
    mean = (x * valid).sum(dim=1, keepdim=True) / count
    var = (((x - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + eps) * valid


def layer_norm(x_BTD: Tensor, padding_mask: Tensor | None = None, eps: float = EPS) -> Tensor:
    """Normalises each position over channels. fp32 out; padded positions zeroed."""
    y = F.layer_norm(x_BTD.float(), x_BTD.shape[-1:], eps=eps)
    if padding_mask is not None:
        y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    return y


def normalize(x_BTD: Tensor, norm: str | None, padding_mask: Tensor | None = None) -> Tensor:
    _check_norm(norm)
    if norm == "instance":
        return instance_norm(x_BTD, padding_mask)
    if norm == "layer":
        return layer_norm(x_BTD, padding_mask)
    y = x_BTD.float()
    return y if padding_mask is None else y.masked_fill(padding_mask.unsqueeze(-1), 0.0)


def build_targets(
    layer_outputs: Sequence[Tensor],
    *,
    top_k: int,
    layer_norm: str | None,
    final_norm: str | None,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Reference form: averages the normalised last `top_k` of `layer_outputs` (each B×T×D)."""
    if not 1 <= top_k <= len(layer_outputs):
        raise ValueError(f"top_k={top_k} but {len(layer_outputs)} layer outputs were given")
    acc = None
    for a in layer_outputs[-top_k:]:
        acc = accumulate(acc, a, layer_norm=layer_norm, padding_mask=padding_mask)
    return finalize(acc, top_k=top_k, final_norm=final_norm, padding_mask=padding_mask)


def accumulate(acc: Tensor | None, layer_output: Tensor, *, layer_norm: str | None, padding_mask: Tensor | None = None) -> Tensor:
    """Adds N_pre(layer_output) into the fp32 running sum `acc` (allocated when None). Returns acc."""
    y = normalize(layer_output, layer_norm, padding_mask)
    if acc is None:
        return y if y.data_ptr() != layer_output.data_ptr() else y.clone()
    return acc.add_(y)


def finalize(acc: Tensor, *, top_k: int, final_norm: str | None, padding_mask: Tensor | None = None) -> Tensor:
    """Turns the running sum of `top_k` normalised layers into the target (fp32 B×T×D)."""
    return normalize(acc.div_(top_k), final_norm, padding_mask)
