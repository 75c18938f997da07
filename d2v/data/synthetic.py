"""Synthetic in-memory speech-like batches for tests, smoke runs and benchmarks.

Each utterance is a few harmonic "voiced" segments (random pitch, formant-like amplitude
envelopes) separated by noise bursts, so the waveform has structure at several time scales
that the model can learn; nothing is read from disk. Masks are made here as the collate step
would, with a generator seeded by (seed, index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from d2v.batch import Batch
from d2v.config.mask_kinds import mask_config
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


def synthetic_image_batch(batch_size: int, *, image_size: int, patch_size: int, num_masked: int, min_block: int,
                          seed: int = 0, index: int = 0) -> Batch:
    """Smooth random images (low-frequency noise upsampled) with BEiT block masks."""
    from d2v.masking import block_mask_2d

    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    coarse = torch.randn(batch_size, 3, 4, 4, generator=gen)
    images = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images + 0.1 * torch.randn(images.shape, generator=gen)
    grid = image_size // patch_size
    mask = block_mask_2d(batch_size, (grid, grid), num_masked=num_masked, min_block=min_block, generator=gen)
    return Batch(source=images, mask=mask, keys=[f"synthetic-{index}-{b}" for b in range(batch_size)])


def synthetic_text_batch(batch_size: int, *, seq_len: int, vocab_size: int, mask_prob: float, mask_length: int,
                         seed: int = 0, index: int = 0) -> Batch:
    """Token sequences from a small Markov chain (so context predicts tokens), span-masked with `<mask>`."""
    from d2v.masking import apply_token_mask, text_span_mask

    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    mask_id, first = vocab_size - 1, 4
    table = torch.Generator().manual_seed(seed)
    successors = torch.randint(first, mask_id, (mask_id, 3), generator=table)  # each token has 3 likely successors
    tokens = torch.empty(batch_size, seq_len, dtype=torch.long)
    tokens[:, 0] = 0  # <s>
    cur = torch.randint(first, mask_id, (batch_size,), generator=gen)
    for t in range(1, seq_len):
        pick = torch.randint(0, 3, (batch_size,), generator=gen)
        cur = successors[cur, pick]
        tokens[:, t] = cur
    selected = text_span_mask(batch_size, seq_len, mask_prob=mask_prob, mask_length=mask_length, generator=gen)
    masked = apply_token_mask(tokens, selected, mask_id=mask_id, generator=gen)
    return Batch(source=tokens, mask=selected, masked_source=masked,
                 keys=[f"synthetic-{index}-{b}" for b in range(batch_size)])


def _audio_samples(cfg) -> int:
    return int(cfg.data.synthetic_seconds * cfg.model.audio.sample_rate)


def _audio_v1(cfg, batch_size: int, seed: int, index: int) -> Batch:
    m, mk = cfg.model, cfg.masking
    return synthetic_audio_batch(batch_size, _audio_samples(cfg), conv_layers=m.audio.conv_layers,
                                 mask_prob=mk.mask_prob, mask_length=mk.mask_length, min_masks=mk.min_masks,
                                 equalize=mk.equalize, seed=seed, index=index)


def _audio_base(cfg, batch_size: int, seed: int, index: int) -> Batch:
    return synthetic_audio_batch(batch_size, _audio_samples(cfg), conv_layers=cfg.model.audio.conv_layers,
                                 mask_prob=0.5, mask_length=1, seed=seed, index=index)


def _image_v1(cfg, batch_size: int, seed: int, index: int) -> Batch:
    im, mk = cfg.model.image, cfg.masking
    return synthetic_image_batch(batch_size, image_size=im.image_size, patch_size=im.patch_size,
                                 num_masked=mk.num_mask_patches, min_block=mk.min_block_patches, seed=seed,
                                 index=index)


def _image_base(cfg, batch_size: int, seed: int, index: int) -> Batch:
    im = cfg.model.image
    return synthetic_image_batch(batch_size, image_size=im.image_size, patch_size=im.patch_size, num_masked=0,
                                 min_block=1, seed=seed, index=index)


def _text_v1(cfg, batch_size: int, seed: int, index: int) -> Batch:
    t, mk = cfg.model.text, cfg.masking
    return synthetic_text_batch(batch_size, seq_len=t.max_positions, vocab_size=t.vocab_size,
                                mask_prob=mk.mask_prob, mask_length=mk.mask_length, seed=seed, index=index)


def _text_base(cfg, batch_size: int, seed: int, index: int) -> Batch:
    t = cfg.model.text
    return synthetic_text_batch(batch_size, seq_len=t.max_positions, vocab_size=t.vocab_size, mask_prob=0.0,
                                mask_length=1, seed=seed, index=index)


@dataclass(frozen=True)
class SyntheticMaker:
    """A modality's synthetic inputs: (cfg, batch_size, seed, index) -> Batch."""

    v1: Callable[..., Batch]
    """Inputs with the 1.0 masks of the config's masking section."""
    base: Callable[..., Batch]
    """The same inputs (the same generator draws) for 2.0, whose masks replace the ones made here."""


MAKERS: dict[str, SyntheticMaker] = {
    "audio": SyntheticMaker(_audio_v1, _audio_base),
    "image": SyntheticMaker(_image_v1, _image_base),
    "text": SyntheticMaker(_text_v1, _text_base),
}


def synthetic_batch(cfg, batch_size: int, *, seed: int, index: int) -> Batch:
    """A synthetic micro-batch shaped by a D2vConfig, for any modality (2.0: B×M×T masks)."""
    maker = MAKERS[cfg.model.modality]
    if mask_config(cfg.masking).clones:
        return _synthetic_batch_v2(cfg, maker, batch_size, seed=seed, index=index)
    return maker.v1(cfg, batch_size, seed, index)


def _synthetic_batch_v2(cfg, maker: SyntheticMaker, batch_size: int, *, seed: int, index: int) -> Batch:
    """The 1.0 synthetic inputs with data2vec 2.0 masks (M per sample) made as the collate would."""
    from d2v.masking.makers import mask_maker

    base = maker.base(cfg, batch_size, seed, index)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) * 2 + 1)
    mask = mask_maker(cfg)(batch_size, base.mask.shape[-1], base.padding_mask, gen)
    return replace(base, mask=mask, masked_source=None)
