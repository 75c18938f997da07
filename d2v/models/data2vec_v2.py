"""The data2vec 2.0 student (docs/method.md §3.3; arXiv 2212.07525): feature encoder once per sample,
M clones with their own masks, the encoder over the kept tokens only, a conv decoder that
predicts every position. The teacher is the same `TeacherNet` as 1.0 over a copy of the tracked
parts: `EncoderV2.forward` is its full-sequence path.

Legend: B samples, M masks per sample, N = B·M student rows, T positions, K kept per row,
D width, P masked (non-padded) positions over all N rows.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from d2v.batch import TargetIndex
from d2v.models.audio import Features, Known
from d2v.models.decoders import ConvDecoder, fill_masked
from d2v.models.encoder_v2 import EncoderV2


class StudentOutputV2(NamedTuple):
    features: Features
    """The feature encoder's output, once per sample (B×T×D, before dropout): the teacher's input."""
    prediction: Tensor
    """P×D decoder output at the masked non-padded positions of the N rows (row-major order of the mask)."""
    cls: Tensor | None
    """N×D encoder output at the CLS token (image), None without one."""


class Data2VecV2(nn.Module):
    def __init__(self, frontend: nn.Module, encoder: EncoderV2, decoder: ConvDecoder, *, embed_dim: int,
                 num_masks: int, feature_dropout: float = 0.0, decoder_input_dropout: float = 0.0,
                 mask_noise_std: float = 0.01) -> None:
        super().__init__()
        self.frontend = frontend
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.encoder = encoder
        self.decoder_dropout = nn.Dropout(decoder_input_dropout)
        self.decoder = decoder
        self.embed_dim = embed_dim
        self.num_masks = num_masks
        self.mask_noise_std = mask_noise_std

    def features(self, source: Tensor, source_lengths: Tensor | None = None, known: Known | None = None) -> Features:
        """Runs the modality feature encoder once per sample; the teacher may reuse the result."""
        if known is None:
            return self.frontend(source, source_lengths)
        return self.frontend(source, source_lengths, known)

    def encode(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None, *,
               keep_extra_tokens: bool = False) -> Tensor:
        """The whole sequence, nothing masked (probes, fine-tuning): B×T×D (B×(E+T)×D if asked)."""
        out = self.encoder(self.feature_dropout(x_BTD), padding_mask_BT)
        return out if keep_extra_tokens else out[:, self.encoder.num_extra_tokens:]

    def forward(self, source: Tensor, mask_BMT: Tensor, source_lengths: Tensor | None = None, *,
                layer_seed: int | None = None, index: TargetIndex | None = None) -> StudentOutputV2:
        """mask_BMT: B×M×T bool, True = masked (dropped from the student's input, predicted).
        index: the batch's host-derived positions (training): nothing is read back from the device."""
        feats = self.features(source, source_lengths, None if index is None else Known(index.padding_mask))
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
        return StudentOutputV2(feats, pred_PD, h[:, 0] if extra else None)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
