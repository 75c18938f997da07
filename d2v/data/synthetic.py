"""Synthetic in-memory speech-like batches for tests, smoke runs and benchmarks.

Each utterance is a few harmonic "voiced" segments (random pitch, formant-like amplitude
envelopes) separated by noise bursts, so the waveform has structure at several time scales
that the model can learn; nothing is read from disk. Masks are made here as the collate step
would, with a generator seeded by (seed, index).
"""
from __future__ import annotations

import math

import torch

from d2v.batch import Batch
from d2v.masking import span_mask
from d2v.shapes import conv_output_length


def synthetic_waveform(num_samples: int, generator: torch.Generator, sample_rate: int = 16_000) -> torch.Tensor:
    t = torch.arange(num_samples, dtype=torch.float32) / sample_rate
    wave = torch.zeros(num_samples)
    pos = 0
    while pos < num_samples:
        seg = int(sample_rate * (0.08 + 0.25 * torch.rand((), generator=generator).item()))
        end = min(num_samples, pos + seg)
        tt = t[pos:end]
        if torch.rand((), generator=generator).item() < 0.75:
            f0 = 90.0 + 200.0 * torch.rand((), generator=generator).item()
            for h in range(1, 6):
                amp = torch.rand((), generator=generator).item() / h
                wave[pos:end] += amp * torch.sin(2 * math.pi * f0 * h * tt)
            wave[pos:end] *= torch.hann_window(end - pos, periodic=False) if end - pos > 1 else 1.0
        else:
            wave[pos:end] = 0.3 * torch.randn(end - pos, generator=generator)
        pos = end
    wave += 0.01 * torch.randn(num_samples, generator=generator)
    return (wave - wave.mean()) / (wave.std() + 1e-5)


def synthetic_audio_batch(batch_size: int, num_samples: int, *, conv_layers, mask_prob: float, mask_length: int,
                          min_masks: int = 1, equalize: str | None = "min", seed: int = 0, index: int = 0) -> Batch:
    """A Batch of equal-length utterances with span masks, deterministic in (seed, index)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    source = torch.stack([synthetic_waveform(num_samples, gen) for _ in range(batch_size)])
    frames = conv_output_length(num_samples, conv_layers)
    mask = span_mask(batch_size, frames, mask_prob=mask_prob, mask_length=mask_length, min_masks=min_masks,
                     equalize=equalize, generator=gen)
    lengths = torch.full((batch_size,), num_samples, dtype=torch.long)
    return Batch(source=source, mask=mask, source_lengths=lengths,
                 keys=[f"synthetic-{index}-{b}" for b in range(batch_size)])


def synthetic_batches_for(cfg, *, seed: int | None = None, start: int = 0):
    """An endless iterator of synthetic micro-batches shaped by a D2vConfig."""
    m, mk, d = cfg.model, cfg.masking, cfg.data
    n = int(d.synthetic_seconds * m.audio.sample_rate)
    s = cfg.train.seed if seed is None else seed
    i = start
    while True:
        yield synthetic_audio_batch(cfg.train.micro_batch_size, n, conv_layers=m.audio.conv_layers,
                                    mask_prob=mk.mask_prob, mask_length=mk.mask_length, min_masks=mk.min_masks,
                                    equalize=mk.equalize, seed=s, index=i)
        i += 1
