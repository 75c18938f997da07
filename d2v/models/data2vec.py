"""The data2vec model assembled from parts: feature encoder, mask embedding,
shared Transformer encoder, regression head. The student's forward runs all of them; the
teacher is a `TeacherNet` over copies of the tracked parts (no head, no mask embedding).
Both top-level modules own no parameters directly, so ZeRO-3's per-module gathering sees every
parameter through a submodule call.

Legend: B batch, T sequence, D width, N masked positions in the batch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from d2v.batch import TargetIndex
from d2v.models.audio import Features, Known
from d2v.models.encoder import Tap, TransformerEncoder


class MaskEmbedding(nn.Module):
    """A learned vector that replaces the features at masked positions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim).uniform_())  # fairseq's U[0, 1) init

    def forward(self, x_BTD: Tensor, mask_BT: Tensor) -> Tensor:
        return torch.where(mask_BT.unsqueeze(-1), self.weight.to(x_BTD.dtype), x_BTD)


class StudentOutput(NamedTuple):
    features: Features
    """The feature encoder's output on the student's input, before dropout and masking."""
    prediction: Tensor
    """N×D head output at the masked positions (row-major order of the mask)."""


class Data2Vec(nn.Module):
    def __init__(self, frontend: nn.Module | None, encoder: TransformerEncoder, head: nn.Module | None,
                 *, embed_dim: int, feature_dropout: float = 0.0, mask_embedding: bool = True) -> None:
        super().__init__()
        self.frontend = frontend
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.mask_embedding = MaskEmbedding(embed_dim) if mask_embedding else None
        self.encoder = encoder
        self.head = head
        self.embed_dim = embed_dim

    def features(self, source: Tensor, source_lengths: Tensor | None = None, known: Known | None = None) -> Features:
        """Runs the modality feature encoder once; the teacher may reuse the result."""
        if known is None:
            return self.frontend(source, source_lengths)
        return self.frontend(source, source_lengths, known)

    def encode(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None, mask_BT: Tensor | None = None, *,
               layer_seed: int | None = None, tap: Tap | None = None, keep_extra_tokens: bool = False) -> Tensor:
        """Encodes features; masked positions are replaced by the learned mask embedding first.

        Returns B×T×D (or B×(E+T)×D with the E extra tokens such as CLS first, if asked).
        """
        x_BTD = self.feature_dropout(x_BTD)
        if mask_BT is not None:
            if self.mask_embedding is None:
                raise RuntimeError("a mask was given but this model has no mask embedding")
            x_BTD = self.mask_embedding(x_BTD, mask_BT)
        out = self.encoder(x_BTD, padding_mask_BT, layer_seed=layer_seed, tap=tap)
        return out if keep_extra_tokens else out[:, self.encoder.num_extra_tokens:]

    def forward(self, source: Tensor, mask_BT: Tensor, source_lengths: Tensor | None = None, *,
                masked_source: Tensor | None = None, layer_seed: int | None = None,
                index: TargetIndex | None = None) -> StudentOutput:
        """The student: features of the (masked) input, encoder, head at the masked positions.

        masked_source: a token-level student view made in collate (text); the feature-level
        mask embedding is then not applied.
        index: the batch's host-derived target positions (training); without it the positions
        are read from the mask, which waits for the device.
        """
        known = None if index is None else Known(index.padding_mask)
        feats = self.features(masked_source if masked_source is not None else source, source_lengths, known)
        if mask_BT.shape != feats.x.shape[:2]:
            raise ValueError(f"mask is {tuple(mask_BT.shape)} but the model produced {tuple(feats.x.shape[:2])} "
                             f"positions; masks must be made for the feature encoder's output length")
        if index is None and feats.padding_mask is not None and bool((mask_BT & feats.padding_mask).any()):
            raise ValueError("the mask marks padded positions; masks must respect padding")
        h_BTD = self.encode(feats.x, feats.padding_mask, None if masked_source is not None else mask_BT,
                            layer_seed=layer_seed)
        at_mask = h_BTD[mask_BT] if index is None else h_BTD.flatten(0, 1).index_select(0, index.targets)
        return StudentOutput(feats, self.head(at_mask))

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class TeacherNet(nn.Module):
    """The teacher's network: copies of the tracked parts. With a feature encoder it reads the
    raw source; without one it reads the student's features."""

    def __init__(self, frontend: nn.Module | None, encoder: TransformerEncoder) -> None:
        super().__init__()
        self.frontend = frontend
        self.encoder = encoder

    def forward(self, inputs: Tensor, padding_mask_BT: Tensor | None = None, *, tap: Tap | None = None) -> Tensor:
        x = self.frontend(inputs).x if self.frontend is not None else inputs
        return self.encoder(x, padding_mask_BT, tap=tap)
