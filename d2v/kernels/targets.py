"""Dispatch for the streaming data2vec targets (docs/method.md §5): `accumulate`, `finalize` and the
list form `fused_targets`, with the semantics of targets_reference.py.

Backend, chosen per call:
* `D2V_KERNELS=off`     → the PyTorch reference, everywhere;
* `D2V_KERNELS=triton`  → the Triton kernels even for CPU tensors; only meaningful with
  `TRITON_INTERPRET=1` set before kernels.targets_triton is imported (tests do this);
* unset / anything else → Triton for CUDA tensors when triton imports, the reference otherwise.

Both backends sit behind two torch.library custom ops, so torch.compile traces a teacher that
calls them as opaque nodes (fake implementations give the shapes):
* `d2v_kernels::normalize(x, norm, mask, scale) -> Tensor`: fp32 norm(x·scale), new tensor;
* `d2v_kernels::accumulate_(acc!, x, norm, mask) -> ()`: acc += norm(x), in place.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from d2v.kernels import targets_reference as ref

try:
    from d2v.kernels import targets_triton as _tt  # module attribute: tests reload it interpreted
except ImportError:  # pragma: no cover - triton missing
    _tt = None


def backend(x: Tensor) -> str:
    """'triton' or 'reference' for a tensor on x's device, following D2V_KERNELS."""
    mode = os.environ.get("D2V_KERNELS", "auto").lower()
    if mode == "off" or _tt is None:
        return "reference"
    if mode == "triton" or x.is_cuda:
        return "triton"
    return "reference"


def _check(x: Tensor, norm: str | None, mask: Tensor | None) -> None:
    ref.check_norm(norm)
    if x.dim() != 3:
        raise ValueError(f"layer outputs are B×T×D, got shape {tuple(x.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:2]):
        raise ValueError(f"padding_mask must be bool B×T={tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")


@torch.library.custom_op("d2v_kernels::normalize", mutates_args=())
def _normalize_op(x: Tensor, norm: str | None, mask: Tensor | None, scale: float) -> Tensor:
    if backend(x) == "reference":
        return ref.normalize(x, norm, mask, scale)
    out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    _tt.normalize_into(x, norm, mask, scale, out, add=False)
    return out


@_normalize_op.register_fake
def _(x: Tensor, norm: str | None, mask: Tensor | None, scale: float) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("d2v_kernels::accumulate_", mutates_args=("acc",))
def _accumulate_op(acc: Tensor, x: Tensor, norm: str | None, mask: Tensor | None) -> None:
    if backend(x) == "reference":
        acc.add_(ref.normalize(x, norm, mask))
    else:
        _tt.normalize_into(x, norm, mask, 1.0, acc, add=True)


@_accumulate_op.register_fake
def _(acc: Tensor, x: Tensor, norm: str | None, mask: Tensor | None) -> None:
    return None


def accumulate(acc: Tensor | None, layer_output: Tensor, *, layer_norm: str | None,
               padding_mask: Tensor | None = None) -> Tensor:
    """acc (fp32 contiguous B×T×D) += N_pre(layer_output); a new acc when None. Returns acc."""
    _check(layer_output, layer_norm, padding_mask)
    if acc is None:
        return _normalize_op(layer_output, layer_norm, padding_mask, 1.0)
    if acc.dtype != torch.float32 or acc.shape != layer_output.shape:
        raise ValueError(f"acc must be fp32 {tuple(layer_output.shape)}, got {acc.dtype} {tuple(acc.shape)}")
    _accumulate_op(acc, layer_output, layer_norm, padding_mask)
    return acc


def finalize(acc: Tensor, *, top_k: int, final_norm: str | None, padding_mask: Tensor | None = None) -> Tensor:
    """Target = N_post(acc / top_k), fp32 B×T×D (a new tensor; acc is not divided in place)."""
    _check(acc, final_norm, padding_mask)
    return _normalize_op(acc, final_norm, padding_mask, 1.0 / top_k)


def fused_targets(layer_outputs: Sequence[Tensor], *, top_k: int, layer_norm: str | None,
                  final_norm: str | None, padding_mask: Tensor | None = None) -> Tensor:
    """Same signature and result as targets_reference.fused_targets, built on accumulate/finalize."""
    if not 1 <= top_k <= len(layer_outputs):
        raise ValueError(f"top_k={top_k} but {len(layer_outputs)} layer outputs were given")
    acc = None
    for a in layer_outputs[-top_k:]:
        acc = accumulate(acc, a, layer_norm=layer_norm, padding_mask=padding_mask)
    return finalize(acc, top_k=top_k, final_norm=final_norm, padding_mask=padding_mask)
