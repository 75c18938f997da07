"""Transformer blocks that also return their FFN output, the data2vec target tap (docs/method.md §3.1).

Post-LN (audio, text, all of 2.0):  h = LN1(x + dp(drop(attn(x))));  f = fc2(act(fc1(h)));  out = LN2(h + dp(drop(f)))
Pre-LN (vision 1.0, BEiT):          h = x + dp(λ1·attn(LN1(x)));  f = fc2(act(fc1(LN2(h))));  out = h + dp(λ2·f)
`f` is taken before dropout, residual and the post-LN, as the reference does. dp is drop path (stochastic
depth, per sample): 0 in pretraining except vision 1.0; image fine-tuning sets it per block (fairseq's
2.0 AltBlock applies it to both residual branches of the post-LN block too).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.models.attention import SelfAttention


class BlockOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 must see the tensors a module returns to hook its backward."""

    x: Tensor
    """B×T×D block output (the residual stream after the block)."""
    ffn: Tensor
    """B×T×D FFN output before dropout/residual/LN: the target tap."""


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation_dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(F.gelu(self.fc1(x))))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (BEiT's gamma, transformers' lambda)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample (timm semantics)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, *, layer_norm_first: bool, eps: float,
                 dropout: float, attention_dropout: float, activation_dropout: float,
                 drop_path: float = 0.0, layer_scale_init: float = 0.0,
                 qkv_bias: tuple[bool, bool, bool] = (True, True, True)) -> None:
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.attention = SelfAttention(dim, num_heads, dropout=attention_dropout, qkv_bias=qkv_bias)
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, ffn_dim, activation_dropout)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = drop_path
        if layer_scale_init > 0:
            self.layer_scale_1 = LayerScale(dim, layer_scale_init)
            self.layer_scale_2 = LayerScale(dim, layer_scale_init)
        else:
            self.layer_scale_1 = self.layer_scale_2 = None

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, bias: Tensor | None = None) -> BlockOutput:
        if self.layer_norm_first:
            a = self.dropout(self.attention(self.attention_norm(x), padding_mask, bias))
            if self.layer_scale_1 is not None:
                a = self.layer_scale_1(a)
            h = x + drop_path(a, self.drop_path, self.training)
            f = self.ffn(self.ffn_norm(h))
            g = self.dropout(f)
            if self.layer_scale_2 is not None:
                g = self.layer_scale_2(g)
            return BlockOutput(h + drop_path(g, self.drop_path, self.training), f)
        a = self.dropout(self.attention(x, padding_mask, bias))
        h = self.attention_norm(x + drop_path(a, self.drop_path, self.training))
        f = self.ffn(h)
        return BlockOutput(self.ffn_norm(h + drop_path(self.dropout(f), self.drop_path, self.training)), f)
