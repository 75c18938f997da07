"""Plain PyTorch attention: the reference every fast path is tested against (docs/method.md §5).

Legend: B batch, H heads, Tq/Tk query/key length, Dh head width.
It materializes the Tq×Tk scores, so it costs O(T²) memory; it is the `D2V_KERNELS=off` path
and the float64 oracle of the parity tests.

ALiBi (Press et al. 2022, "Train Short, Test Long"): bias_ij = -|p_i - p_j| · slope_h · scale_h,
with the standard geometric slopes and a learned per-head scale (data2vec 2.0 keeps the slopes
fixed and learns the scale). Positions p are the original token indices, so that when masked
tokens are dropped from the student's input the distances stay those of the full sequence.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Alibi(NamedTuple):
    """ALiBi computed inside the kernel. `slopes_H` fixed fp32 per-head slopes; `scale_H` a
    learned per-head multiplier (its gradient is returned); `positions_BT` int kept positions
    (shared by queries and keys, so Tq == Tk) or None for 0..T-1."""

    slopes_H: Tensor
    scale_H: Tensor
    positions_BT: Tensor | None = None


def alibi_slopes(num_heads: int) -> Tensor:
    """Standard ALiBi slopes 2^(-8i/n) for the largest power of two n <= num_heads; the
    remaining heads take every other slope of the 2n sequence (the paper's non-power-of-2
    rule, used for data2vec 2.0's 12 heads)."""
    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    n = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(n)
    if n < num_heads:
        slopes += geometric(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(alibi: Alibi, batch: int, tq: int, tk: int, device=None) -> Tensor:
    """Dense B×H×Tq×Tk (or 1×H×Tq×Tk without positions) fp32 bias; differentiable in scale_H."""
    coef_H = alibi.slopes_H.float() * alibi.scale_H.float()
    if alibi.positions_BT is None:
        pq, pk = torch.arange(tq, device=device), torch.arange(tk, device=device)
        dist = (pq[:, None] - pk[None, :]).abs().float()[None, None]
    else:
        p = alibi.positions_BT.float()
        if p.shape[1] != tq or tq != tk:
            raise ValueError(f"ALiBi positions {tuple(p.shape)} need Tq == Tk == T, got {tq}, {tk}")
        dist = (p[:, :, None] - p[:, None, :]).abs()[:, None]
    return -dist * coef_H.to(dist.device)[None, :, None, None]


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
                        bias: Tensor | None = None, alibi: Alibi | None = None, dropout_p: float = 0.0,
                        keep_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Softmax(q kᵀ·scale + bias + alibi, padded keys excluded) v, with softmax in fp32 (float64
    inputs stay float64). A query whose keys are all padded outputs 0 (not NaN, not the mean).
    Dropout: `keep_mask` (bool, broadcastable to B×H×Tq×Tk) given explicitly so tests can
    rebuild the kernel's Philox mask; without it `dropout_p` draws from torch's generator."""
    B, H, Tq, Dh = q.shape
    Tk = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = Dh ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), k.to(acc)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    if alibi is not None:
        s = s + alibi_bias(alibi, B, Tq, Tk, q.device).to(acc)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    # Rows with every score -inf: softmax would be 0/0. Keep them finite, then zero them.
    dead = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if keep_mask is not None:
        p = p * keep_mask.to(acc) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, dropout_p)
    return torch.einsum("bhqk,bhkd->bhqd", p, v.to(acc)).to(q.dtype)
