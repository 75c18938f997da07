"""Multi-head self-attention that calls only `kernels.attention` (docs/method.md §5).

Legend: B batch, T sequence, D width, H heads, Dh = D / H.
Separate q/k/v/out projections keep the transformers export a renaming (docs/method.md §8).
"""
from __future__ import annotations

from torch import Tensor, nn

from d2v import kernels
class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, *, dropout: float = 0.0,
                 qkv_bias: tuple[bool, bool, bool] = (True, True, True)) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias[0])
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias[1])
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias[2])
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        return x_BTD.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)

    def forward(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None,
                bias: Tensor | kernels.Alibi | None = None) -> Tensor:
        """bias: an additive tensor, or a `kernels.Alibi` (2.0 audio) that the kernel computes itself."""
        B, T, D = x_BTD.shape
        q, k, v = (self._heads(p(x_BTD)) for p in (self.q_proj, self.k_proj, self.v_proj))
        alibi = bias if isinstance(bias, kernels.Alibi) else None
        o_BHTd = kernels.attention(
            q, k, v, key_padding_mask=padding_mask_BT, bias=None if alibi is not None else bias, alibi=alibi,
            dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o_BHTd.transpose(1, 2).reshape(B, T, D))
