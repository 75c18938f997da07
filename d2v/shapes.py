"""Sequence-length arithmetic shared by the data pipeline and the models.

Pure functions of integers (standard library only), so that the loader can compute frame
counts and masks without importing model code (docs/method.md §2).
"""
from __future__ import annotations

from typing import Sequence

def conv_output_length(num_samples: int, conv_layers: Sequence[Sequence[int]]) -> int:
    """Frames produced by unpadded strided convolutions: 16,000 samples -> 49, 320,000 -> 999."""
    n = int(num_samples)
    for _, kernel, stride in conv_layers:
        n = (n - kernel) // stride + 1
        if n <= 0:
            return 0
    return n


def min_samples_for_frames(num_frames: int, conv_layers: Sequence[Sequence[int]]) -> int:
    """Smallest waveform length that yields `num_frames` frames (inverse of conv_output_length)."""
    n = int(num_frames)
    for _, kernel, stride in reversed(list(conv_layers)):
        n = (n - 1) * stride + kernel
    return n
