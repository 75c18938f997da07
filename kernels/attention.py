"""Attention dispatch (placeholder until the Triton kernel lands): PyTorch SDPA / reference.

Contract: q, k, v are B×H×T×Dh; key_padding_mask is B×Tk bool with True at padded keys;
bias is an additive float tensor broadcastable to B×H×Tq×Tk; returns B×H×Tq×Dh.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
              bias: Tensor | None = None, alibi=None, dropout_p: float = 0.0) -> Tensor:
    if alibi is not None:
        raise NotImplementedError("ALiBi attention arrives with the Triton kernels")
    attn_mask = None
    if bias is not None:
        attn_mask = bias.to(q.dtype)
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        attn_mask = pad if attn_mask is None else attn_mask + pad
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
