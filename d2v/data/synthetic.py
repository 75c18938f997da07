"""Synthetic in-memory batches of every modality for tests, smoke runs and benchmarks.

Nothing is read from disk. Each modality's inputs have structure the model can learn: speech-like
utterances (harmonic "voiced" segments with formant-like envelopes between noise bursts, structure
at several time scales), smooth images, Markov-chain token sequences. Masks are made by the run's
mask maker, as the collate step would, with a generator seeded by (seed, index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from d2v.batch import Batch
from d2v.config.mask_kinds import mask_config
from d2v.config.modalities import modality_spec
from d2v.masking import apply_token_mask


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


@dataclass
class SyntheticInputs:
    """A modality's synthetic inputs, before masking: the batch's source and what masking needs."""

    source: torch.Tensor
    source_lengths: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    mask_id: int | None = None
    """The `<mask>` token of token inputs (a student that fills the masked positions reads a token
    view with it); None for inputs that are not tokens."""


def _audio_inputs(cfg, batch_size: int, gen: torch.Generator) -> SyntheticInputs:
    """Equal-length speech-like utterances of data.synthetic_seconds."""
    m = cfg.model
    n = int(cfg.data.synthetic_seconds * m.audio.sample_rate)
    source = torch.stack([synthetic_waveform(n, gen) for _ in range(batch_size)])
    return SyntheticInputs(source, source_lengths=torch.full((batch_size,), n, dtype=torch.long))


def _image_inputs(cfg, batch_size: int, gen: torch.Generator) -> SyntheticInputs:
    """Smooth random images (low-frequency noise upsampled) plus a little pixel noise."""
    im = cfg.model.image
    coarse = torch.randn(batch_size, 3, 4, 4, generator=gen)
    images = torch.nn.functional.interpolate(coarse, size=(im.image_size, im.image_size), mode="bilinear",
                                             align_corners=False)
    images = images + 0.1 * torch.randn(images.shape, generator=gen)
    return SyntheticInputs(images)


def _text_inputs(cfg, batch_size: int, gen: torch.Generator, seed: int) -> SyntheticInputs:
    """Token sequences from a small Markov chain (so context predicts tokens), starting with <s>."""
    t = cfg.model.text
    seq_len, mask_id, first = t.max_positions, t.vocab_size - 1, 4
    table = torch.Generator().manual_seed(seed)
    successors = torch.randint(first, mask_id, (mask_id, 3), generator=table)  # each token has 3 likely successors
    tokens = torch.empty(batch_size, seq_len, dtype=torch.long)
    tokens[:, 0] = 0  # <s>
    cur = torch.randint(first, mask_id, (batch_size,), generator=gen)
    for i in range(1, seq_len):
        pick = torch.randint(0, 3, (batch_size,), generator=gen)
        cur = successors[cur, pick]
        tokens[:, i] = cur
    return SyntheticInputs(tokens, mask_id=mask_id)


# Per modality: (cfg, batch_size, generator, seed) -> SyntheticInputs.
INPUTS: dict[str, Callable[..., SyntheticInputs]] = {
    "audio": lambda cfg, b, gen, seed: _audio_inputs(cfg, b, gen),
    "image": lambda cfg, b, gen, seed: _image_inputs(cfg, b, gen),
    "text": _text_inputs,
}


def synthetic_batch(cfg, batch_size: int, *, seed: int, index: int) -> Batch:
    """A synthetic micro-batch shaped by a D2vConfig, deterministic in (seed, index), masked by the
    run's mask maker as the collate step would (B×M×T). A 1.0 student's masks come from the inputs'
    generator; 2.0's from a second one, so that both students see the same inputs."""
    from d2v.masking.makers import mask_maker

    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    inputs = INPUTS[cfg.model.modality](cfg, batch_size, gen, seed)
    if mask_config(cfg.masking).clones:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + index) * 2 + 1)
    spec = modality_spec(cfg.model.modality)
    length = spec.positions(cfg.model, inputs.source.shape[-1] if spec.varies_in_length else None)
    mask = mask_maker(cfg)(batch_size, length, inputs.padding_mask, gen)
    masked = None
    if inputs.mask_id is not None and not cfg.model.drops_masked:
        mk = cfg.masking
        masked = apply_token_mask(inputs.source, mask, mask_id=inputs.mask_id, random_token_prob=mk.random_token_prob,
                                  leave_unmasked_prob=mk.leave_unmasked_prob, generator=gen)
    return Batch(source=inputs.source, mask=mask, padding_mask=inputs.padding_mask,
                 source_lengths=inputs.source_lengths, masked_source=masked,
                 keys=[f"synthetic-{index}-{b}" for b in range(batch_size)])


def synthetic_batches_for(cfg, *, seed: int | None = None, start: int = 0):
    """An endless iterator of synthetic micro-batches (train.micro_batch_size) shaped by a D2vConfig."""
    s = cfg.train.seed if seed is None else seed
    i = start
    while True:
        yield synthetic_batch(cfg, cfg.train.micro_batch_size, seed=s, index=i)
        i += 1
