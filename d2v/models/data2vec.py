"""The data2vec student of 1.0 and 2.0 assembled from parts (docs/method.md §3): feature encoder,
mask embedding or dropped tokens, shared Transformer encoder, regression head or conv decoder.
The student's forward runs all of them; the teacher is a `TeacherNet` over copies of the tracked
parts (no head, decoder or mask embedding).
Both top-level modules own no parameters directly, so ZeRO-3's per-module gathering sees every
parameter through a submodule call.

Legend: B samples, M masks per sample (1 with a head), N = B·M student rows, T positions, K kept
per row, D width, P masked (non-padded) positions over all rows.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from d2v.batch import TargetIndex
from d2v.models.audio import Features, Known
from d2v.models.decoders import ConvDecoder, fill_masked
from d2v.models.encoder import Encoder, Tap


class MaskEmbedding(nn.Module):
    """A learned vector that replaces the features at masked positions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim).uniform_())  # fairseq's U[0, 1) init

    def forward(self, x_BTD: Tensor, mask_BT: Tensor) -> Tensor:
        return torch.where(mask_BT.unsqueeze(-1), self.weight.to(x_BTD.dtype), x_BTD)


class StudentOutput(NamedTuple):
    features: Features
    """The feature encoder's output on the student's input, once per sample (B×T×D, before dropout
    and masking): the teacher may reuse it."""
    prediction: Tensor
    """P×D predictions at the masked non-padded positions of the B·M rows (row-major order of the mask)."""
    cls: Tensor | None = None
    """(B·M)×D encoder output at the CLS token when the model has one and clones (image 2.0), else None."""


class Data2Vec(nn.Module):
    """The student: feature encoder, then per configuration (docs/method.md §3)

    * masked positions filled with a learned embedding (1.0 audio and vision; 1.0 text masks
      tokens in collate instead) and the whole sequence encoded, a linear/MLP `head` at the masked
      positions, one mask per sample (B×T); or
    * masked positions dropped: M clones of each sample's features, each with its own mask (B×M×T),
      only the kept tokens encoded, and a conv `decoder` over the kept outputs with the dropped
      slots refilled (2.0).
    """

    def __init__(self, frontend: nn.Module | None, encoder: Encoder, head: nn.Module | None = None, *,
                 embed_dim: int, feature_dropout: float = 0.0, mask_embedding: bool = True,
                 decoder: ConvDecoder | None = None, num_masks: int = 1, decoder_input_dropout: float = 0.0,
                 mask_noise_std: float = 0.01) -> None:
        super().__init__()
        if (head is None) == (decoder is None):
            raise ValueError("a student predicts with a head (masked positions filled) or a decoder (dropped), "
                             "exactly one of them")
        # Registration order fixes named_parameters(): the optimizer's and ZeRO's flattening order.
        self.frontend = frontend
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.mask_embedding = MaskEmbedding(embed_dim) if mask_embedding and decoder is None else None
        self.encoder = encoder
        self.head = head
        self.decoder_dropout = nn.Dropout(decoder_input_dropout) if decoder is not None else None
        self.decoder = decoder
        self.embed_dim = embed_dim
        self.num_masks = num_masks
        self.mask_noise_std = mask_noise_std

    @property
    def drops_masked(self) -> bool:
        """Whether masked positions are dropped from the encoder's input (and a decoder predicts)."""
        return self.decoder is not None

    def features(self, source: Tensor, source_lengths: Tensor | None = None, known: Known | None = None) -> Features:
        """Runs the modality feature encoder once per sample; the teacher may reuse the result."""
        if known is None:
            return self.frontend(source, source_lengths)
        return self.frontend(source, source_lengths, known)

    def encode(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None, mask_BT: Tensor | None = None, *,
               layer_seed: int | None = None, tap: Tap | None = None, keep_extra_tokens: bool = False,
               channel_mask_BD: Tensor | None = None) -> Tensor:
        """Encodes the whole sequence (probes, fine-tuning; the 1.0 student with masked positions
        replaced by the learned embedding). Returns B×T×D (B×(E+T)×D with the E extra tokens such as
        CLS first, if asked). channel_mask_BD: feature channels zeroed at every position after the
        mask embedding (wav2vec 2.0 fine-tuning's channel masking)."""
        x_BTD = self.feature_dropout(x_BTD)
        if mask_BT is not None:
            if self.mask_embedding is None:
                raise RuntimeError("a mask was given but this model has no mask embedding")
            x_BTD = self.mask_embedding(x_BTD, mask_BT)
        if channel_mask_BD is not None:
            x_BTD = x_BTD.masked_fill(channel_mask_BD.unsqueeze(1), 0.0)
        out = self.encoder(x_BTD, padding_mask_BT, layer_seed=layer_seed, tap=tap)
        return out if keep_extra_tokens else out[:, self.encoder.num_extra_tokens:]

    def forward(self, source: Tensor, mask: Tensor, source_lengths: Tensor | None = None, *,
                masked_source: Tensor | None = None, layer_seed: int | None = None,
                index: TargetIndex | None = None) -> StudentOutput:
        """mask: True = masked (predicted), B×M×T: M = 1 with a head (B×T is read as that), M clones
        with a decoder.
        masked_source: a token-level student view made in collate (1.0 text); the feature-level
        mask embedding is then not applied.
        index: the batch's host-derived target positions (training); without it the positions
        are read from the mask, which waits for the device."""
        if self.drops_masked and masked_source is not None:
            raise ValueError("2.0 batches carry no masked view (masked tokens are dropped); make them with the "
                             "2.0 collate (model.v2.enabled)")
        known = None if index is None else Known(index.padding_mask)
        feats = self.features(masked_source if masked_source is not None else source, source_lengths, known)
        if self.drops_masked:
            return self._predict_dropped(feats, mask, layer_seed, index)
        return self._predict_filled(feats, mask, masked_source is not None, layer_seed, index)

    def _predict_filled(self, feats: Features, mask_BT: Tensor, token_view: bool, layer_seed: int | None,
                        index: TargetIndex | None) -> StudentOutput:
        if mask_BT.dim() == 3:
            if mask_BT.shape[1] != 1:
                raise ValueError(f"the batch carries {mask_BT.shape[1]} masks per sample, but this student fills the "
                                 f"masked positions and takes one (M = 1)")
            mask_BT = mask_BT[:, 0]
        if mask_BT.shape != feats.x.shape[:2]:
            raise ValueError(f"mask is {tuple(mask_BT.shape)} but the model produced {tuple(feats.x.shape[:2])} "
                             f"positions; masks must be made for the feature encoder's output length")
        if index is None and feats.padding_mask is not None and bool((mask_BT & feats.padding_mask).any()):
            raise ValueError("the mask marks padded positions; masks must respect padding")
        h_BTD = self.encode(feats.x, feats.padding_mask, None if token_view else mask_BT, layer_seed=layer_seed)
        at_mask = h_BTD[mask_BT] if index is None else h_BTD.flatten(0, 1).index_select(0, index.targets)
        return StudentOutput(feats, self.head(at_mask))

    def _predict_dropped(self, feats: Features, mask_BMT: Tensor, layer_seed: int | None,
                         index: TargetIndex | None) -> StudentOutput:
        B, T, D = feats.x.shape
        if mask_BMT.dim() != 3 or mask_BMT.shape[0] != B or mask_BMT.shape[2] != T:
            raise ValueError(f"2.0 masks must be B×M×T = {B}×M×{T} for this input, got {tuple(mask_BMT.shape)}; "
                             f"make them with the 2.0 collate (model.v2.enabled)")
        M = mask_BMT.shape[1]
        if M != self.num_masks:
            raise ValueError(f"the batch carries {M} masks per sample but model.v2.num_masks={self.num_masks}")
        mask_NT = mask_BMT.reshape(B * M, T)
        # Clones share the one feature-encoder pass (its gradient sums over them).
        x_NTD = self.feature_dropout(feats.x).repeat_interleave(M, dim=0)
        padding_NT = feats.padding_mask.repeat_interleave(M, dim=0) if feats.padding_mask is not None else None
        h, keep_NK = self.encoder.encode_kept(x_NTD, mask_NT, padding_NT, layer_seed=layer_seed,
                                              kept_BK=None if index is None else index.kept,
                                              kept_padding=None if index is None else index.kept_padding)
        extra = self.encoder.num_extra_tokens
        h_NKD = self.decoder_dropout(h[:, extra:])
        # Noise only in training: evaluation (validation loss, tests) stays deterministic.
        noise = self.mask_noise_std if self.training else 0.0
        pred_NTD = self.decoder(fill_masked(h_NKD, keep_NK, T, noise))
        if index is None:
            targets_NT = mask_NT if padding_NT is None else mask_NT & ~padding_NT
            pred_PD = pred_NTD[targets_NT]
        else:
            pred_PD = pred_NTD.flatten(0, 1).index_select(0, index.targets)
        return StudentOutput(feats, pred_PD, h[:, 0] if extra else None)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class TeacherNet(nn.Module):
    """The teacher's network: copies of the tracked parts. With a feature encoder it reads the
    raw source; without one it reads the student's features."""

    def __init__(self, frontend: nn.Module | None, encoder: Encoder) -> None:
        super().__init__()
        self.frontend = frontend
        self.encoder = encoder

    def forward(self, inputs: Tensor, padding_mask_BT: Tensor | None = None, *, tap: Tap | None = None) -> Tensor:
        x = self.frontend(inputs).x if self.frontend is not None else inputs
        return self.encoder(x, padding_mask_BT, tap=tap)
