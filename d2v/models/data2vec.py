"""The data2vec model assembled from parts (STYLE.md 4): feature encoder, mask embedding,
shared Transformer encoder, regression head. No mode switches in forward: the student calls
`features` then `encode` with a mask and `head`; the teacher (an EMA copy of some parts) calls
`encode` without a mask and with a tap.

Legend: B batch, T sequence, D width.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from d2v.models.audio import Features
from d2v.models.encoder import Tap, TransformerEncoder


class Data2Vec(nn.Module):
    def __init__(self, frontend: nn.Module | None, encoder: TransformerEncoder, head: nn.Module | None,
                 *, embed_dim: int, feature_dropout: float = 0.0, mask_embedding: bool = True) -> None:
        super().__init__()
        self.frontend = frontend
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.mask_embedding = nn.Parameter(torch.empty(embed_dim).uniform_()) if mask_embedding else None
        self.encoder = encoder
        self.head = head
        self.embed_dim = embed_dim

    def features(self, source: Tensor, source_lengths: Tensor | None = None) -> Features:
        """Runs the modality feature encoder once; the teacher may reuse the result."""
        if self.frontend is None:
            raise RuntimeError("this model has no feature encoder (a teacher consuming the student's features)")
        return self.frontend(source, source_lengths)

    def encode(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None, mask_BT: Tensor | None = None, *,
               layer_seed: int | None = None, tap: Tap | None = None, keep_extra_tokens: bool = False) -> Tensor:
        """Encodes features; masked positions are replaced by the learned mask embedding first.

        Returns B×T×D (or B×(E+T)×D with the E extra tokens such as CLS first, if asked).
        """
        x_BTD = self.feature_dropout(x_BTD)
        if mask_BT is not None:
            if self.mask_embedding is None:
                raise RuntimeError("a mask was given but this model has no mask embedding")
            x_BTD = torch.where(mask_BT.unsqueeze(-1), self.mask_embedding.to(x_BTD.dtype), x_BTD)
        out = self.encoder(x_BTD, padding_mask_BT, layer_seed=layer_seed, tap=tap)
        return out if keep_extra_tokens else out[:, self.encoder.num_extra_tokens:]

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
