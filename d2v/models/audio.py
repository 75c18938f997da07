"""Speech feature encoder and convolutional positional encoder (data2vec 1.0 audio, docs/method.md §3.2).

Legend: B batch, S waveform samples, C conv channels, T frames, D model width.
Module names follow transformers' Data2VecAudioModel one-to-one so that export is a renaming
(docs/method.md §8): conv_layers.i.{conv,layer_norm} ~ feature_extractor.conv_layers.i.*,
{layer_norm,projection} ~ feature_projection.*, pos_conv.layers.i.conv ~ encoder.pos_conv_embed.*.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.shapes import conv_output_length


class Features(NamedTuple):
    """A NamedTuple so that ZeRO-3 sees the tensors and hooks the module's backward."""

    x: Tensor
    """B×T×D projected features (before masking and positions)."""
    padding_mask: Tensor | None
    """B×T bool, True at padded frames; None when no row is padded."""


class Known(NamedTuple):
    """What the host worked out with the batch (its padding mask, its input checked): a feature
    encoder given this reads nothing back from the device."""

    padding_mask: Tensor | None


class ConvLayer(nn.Module):
    """Conv1d without bias -> LayerNorm over channels -> GELU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=False)
        self.layer_norm = nn.LayerNorm(c_out, eps=1e-5)
        nn.init.kaiming_normal_(self.conv.weight)

    def forward(self, x_BCS: Tensor) -> Tensor:
        x = self.conv(x_BCS)
        x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class AudioFeatureEncoder(nn.Module):
    """Waveform B×S -> features B×T×D: 7 strided conv layers (320x), LayerNorm, Linear."""

    def __init__(self, conv_layers: Sequence[Sequence[int]], embed_dim: int) -> None:
        super().__init__()
        self.conv_spec = tuple(tuple(int(v) for v in layer) for layer in conv_layers)
        layers, c_in = [], 1
        for c_out, kernel, stride in self.conv_spec:
            layers.append(ConvLayer(c_in, c_out, kernel, stride))
            c_in = c_out
        self.conv_layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(c_in, eps=1e-5)
        self.projection = nn.Linear(c_in, embed_dim)

    def num_frames(self, num_samples: int) -> int:
        return conv_output_length(num_samples, self.conv_spec)

    def forward(self, source_BS: Tensor, source_lengths_B: Tensor | None = None,
                known: Known | None = None) -> Features:
        x = source_BS.unsqueeze(1)
        for layer in self.conv_layers:
            x = layer(x)
        x_BTC = x.transpose(1, 2)
        x_BTD = self.projection(self.layer_norm(x_BTC))
        if known is not None:
            return Features(x_BTD, known.padding_mask)
        padding = None
        T = x_BTD.shape[1]
        if source_lengths_B is not None and bool((source_lengths_B < source_BS.shape[1]).any()):
            frames = torch.tensor([self.num_frames(int(n)) for n in source_lengths_B.tolist()],
                                  device=x_BTD.device)
            padding = torch.arange(T, device=x_BTD.device)[None, :] >= frames[:, None]
        return Features(x_BTD, padding)


class PosConvLayer(nn.Module):
    """Grouped Conv1d (same length) -> LayerNorm without affine -> GELU."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0  # an even kernel yields one extra frame
        self.layer_norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=False)
        # PyTorch's default init: fairseq's multi-layer positional conv (pos_conv_depth > 1,
        # `make_conv_block` in wav2vec2.py) sets none; the N(0, 4/(k·D)) init is its 1-layer variant's.

    def forward(self, x_BDT: Tensor) -> Tensor:
        x = self.conv(x_BDT)
        if self.trim:
            x = x[..., : -self.trim]
        x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class ConvPositionalEncoder(nn.Module):
    """5 positional conv layers over time; the encoder adds the result to its input."""

    def __init__(self, dim: int, depth: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PosConvLayer(dim, kernel, groups) for _ in range(depth))

    def forward(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None) -> Tensor:
        if padding_mask_BT is not None:
            x_BTD = x_BTD.masked_fill(padding_mask_BT.unsqueeze(-1), 0.0)
        x = x_BTD.transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)
