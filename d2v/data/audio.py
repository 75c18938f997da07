"""Speech loading: FLAC samples from WebDataset shards into `Batch`es (docs/method.md §3.2 and §4).

As the data2vec reference (fairseq `RawAudioDataset` with `normalize: true`): 16 kHz mono,
each utterance normalized to zero mean and unit variance, utterances under
`min_sample_size` skipped, longer ones than `max_sample_size` randomly cropped; batches come
from a length-bucketing buffer and hold at most `max_samples_per_batch` samples (batch size ×
padded length, fairseq's max_tokens). By default a batch is randomly cropped to its shortest
utterance (the reference: no padding); `pad=True` pads to the longest instead and sets padding
masks. Masks are made here, by the caller's `mask_fn`, from the batch's generator.

Usage (see `TrainLoader` and `ValidationLoader` for iteration, steps and resume):

    loader = audio_train_loader("shards/train-{000000..000011}.tar", AudioLoaderOptions.from_config(cfg),
                                span_mask_fn(), seed=1, rank=rank, world_size=world, num_workers=2)
    for batch in loader: ...            # loader.steps_per_epoch batches, then the next epoch
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import soundfile
import torch
from torch import Tensor

from d2v.batch import Batch, as_clone_masks
from d2v.data.loader import TrainLoader, ValidationLoader
from d2v.data.plan import BatchingOptions
from d2v.data.shards import expand_pattern, load_index
from d2v.masking.makers import SpanMasks
from d2v.shapes import conv_output_length, min_samples_for_frames

# mask_fn(batch_size, num_frames, padding_mask B×T bool or None, generator) -> B×T bool, True = masked
# (2.0: B×M×T, M masks per utterance; see d2v.masking.multimask)
MaskFn = Callable[[int, int, "Tensor | None", torch.Generator], Tensor]

AUDIO_EXTENSIONS = ("flac", "wav")
ConvLayers = Sequence[Sequence[int]]


@dataclass(kw_only=True)
class AudioLoaderOptions:
    """Loader settings (lengths in samples at `sample_rate`). The run config owns every setting that
    has no default here: `from_config` is the one mapping, so the loader never keeps a value of its own."""

    sample_rate: int
    """Every sample must decode at this rate (prepare resamples to it)."""
    min_sample_size: int
    """Utterances shorter than this are skipped (counted as `too_short`)."""
    max_sample_size: int
    """Longer utterances are randomly cropped to this."""
    max_samples_per_batch: int
    """Budget: batch size × padded length (fairseq max_tokens)."""
    normalize: bool
    """Zero mean, unit variance per utterance (before cropping, as the reference)."""
    pad: bool
    """False: crop the batch to its shortest utterance (the reference); True: pad to the longest."""
    length_multiple: int
    """Cropped batch lengths are rounded down to a multiple of this many samples (0: not rounded)."""
    conv_layers: tuple[tuple[int, int, int], ...]
    """The model's waveform encoder (model.audio.conv_layers): the frames of a crop, its mask and
    its padding are counted with it, so the loader's masks fit the model's frames."""
    max_batch_size: int | None = None
    """Optional cap on utterances per batch."""
    bucket_buffer: int = 512
    """Utterances sorted together to form batches; a worker holds their FLAC bytes in memory."""
    lengths_file: str | None = None
    """Length sidecar; default `lengths.json` beside the shards."""

    @classmethod
    def from_config(cls, cfg) -> "AudioLoaderOptions":
        """The loader settings of a run config (model.audio and data)."""
        d = cfg.data
        return cls(sample_rate=cfg.model.audio.sample_rate, min_sample_size=d.min_sample_size,
                   max_sample_size=d.max_sample_size, max_samples_per_batch=d.max_samples_per_batch,
                   normalize=d.normalize, pad=d.pad, bucket_buffer=min(d.buffer_size, 512),
                   length_multiple=d.length_multiple,
                   conv_layers=tuple(tuple(c) for c in cfg.model.audio.conv_layers))

    def batching(self) -> BatchingOptions:
        return BatchingOptions(budget=self.max_samples_per_batch, max_length=self.max_sample_size,
                               min_length=self.min_sample_size, buffer=self.bucket_buffer,
                               max_batch_size=self.max_batch_size)


def span_mask_fn(mask_prob: float = 0.65, mask_length: int = 10, min_masks: int = 1,
                 equalize: str | None = "min") -> SpanMasks:
    """The data2vec 1.0 speech mask (docs/method.md §3.2) for `mask_fn`."""
    return SpanMasks(mask_prob, mask_length, min_masks, equalize)


def decode_audio(data: bytes, sample_rate: int) -> np.ndarray:
    """float32 mono waveform from FLAC/WAV bytes; raises ValueError on a wrong sample rate."""
    wav, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise ValueError(f"sample rate {rate}, expected {sample_rate}")
    if not np.isfinite(wav).all():  # a float file can hold them; one would turn the whole batch NaN
        raise ValueError("NaN or infinite samples")
    return wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (a layer norm over the whole utterance, eps 1e-5 as F.layer_norm)."""
    wav = wav.astype(np.float32, copy=False)
    return (wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)


def frame_padding_mask(lengths: Sequence[int], num_samples: int, conv_layers: ConvLayers) -> Tensor | None:
    """B×T bool, True at frames that come only from padding; None when no row is padded."""
    frames = torch.tensor([conv_output_length(n, conv_layers) for n in lengths], dtype=torch.long)
    num_frames = conv_output_length(num_samples, conv_layers)
    if bool((frames >= num_frames).all()):
        return None
    return torch.arange(num_frames)[None, :] >= frames[:, None]


def batch_length(lengths: Sequence[int], *, pad: bool, max_sample_size: int, length_multiple: int = 0) -> int:
    """Samples per row of a batch of utterances of `lengths`: the shortest (cropping, the reference)
    or the longest (padding), at most max_sample_size. Cropping rounds down to a multiple of
    length_multiple (when the shortest allows): fewer distinct batch shapes, each planned once."""
    target = min(min(lengths) if not pad else max(lengths), max_sample_size)
    if length_multiple and not pad and target >= length_multiple:
        target -= target % length_multiple
    return target


def collate_audio(waves: Sequence[np.ndarray], keys: Sequence[str], *, pad: bool, max_sample_size: int,
                  mask_fn: MaskFn | None, generator: torch.Generator, conv_layers: ConvLayers,
                  length_multiple: int = 0) -> Batch:
    """Crops (random offsets from `generator`), pads, and masks a list of waveforms.

    pad False: every row cropped to the shortest (capped at max_sample_size; rounded down to a
    multiple of length_multiple), no padding mask.
    pad True: rows longer than max_sample_size cropped to it, the rest zero-padded to the longest.
    """
    target = batch_length([len(w) for w in waves], pad=pad, max_sample_size=max_sample_size,
                          length_multiple=length_multiple)
    # Filled in numpy, then wrapped: row-wise copies into a torch tensor were ~5x slower here.
    rows = np.zeros((len(waves), target), dtype=np.float32)
    kept: list[int] = []
    for row, wav in enumerate(waves):
        if len(wav) > target:
            start = int(torch.randint(0, len(wav) - target + 1, (), generator=generator))
            wav = wav[start:start + target]
        rows[row, : len(wav)] = wav
        kept.append(len(wav))
    source = torch.from_numpy(rows)
    padding_mask = frame_padding_mask(kept, target, conv_layers)
    num_frames = conv_output_length(target, conv_layers)
    if mask_fn is None:
        mask = torch.zeros(len(waves), num_frames, dtype=torch.bool)
    else:
        mask = mask_fn(len(waves), num_frames, padding_mask, generator)
    if padding_mask is not None:
        # padding is never a target, whatever mask_fn does
        mask = as_clone_masks(mask) & ~padding_mask.unsqueeze(1)
    return Batch(source=source, mask=mask, padding_mask=padding_mask,
                 source_lengths=torch.tensor(kept, dtype=torch.long), keys=list(keys))


class AudioBatchMaker:
    """Decodes, normalizes and collates a planned batch; undecodable samples are counted as
    `corrupt` and left out of the batch.

    The plan budgeted the batch with the sidecar's lengths; a sample that decodes longer than
    its listed length would break that budget (a tenth-length claim packs ten times the audio),
    so it is left out too, counted as `corrupt` and as `longer_than_sidecar`."""

    takes_lengths = True  # the loader passes the sidecar's lengths (d2v.data.loader)

    def __init__(self, options: AudioLoaderOptions, mask_fn: MaskFn | None):
        self.options, self.mask_fn = options, mask_fn

    def __call__(self, raw: list[tuple[str, dict[str, bytes]]], generator: torch.Generator,
                 stats: dict[str, int], lengths: Sequence[int] | None = None) -> Batch | None:
        waves: list[np.ndarray] = []
        keys: list[str] = []
        texts: list[str | None] = []
        for j, (key, fields) in enumerate(raw):
            payload = next((fields[e] for e in AUDIO_EXTENSIONS if e in fields), None)
            try:
                if payload is None:
                    raise ValueError("no audio field")
                wav = decode_audio(payload, self.options.sample_rate)
                if len(wav) < min_samples_for_frames(1, self.options.conv_layers):
                    raise ValueError("shorter than one frame")
            except (RuntimeError, ValueError, soundfile.LibsndfileError):
                stats["corrupt"] = stats.get("corrupt", 0) + 1
                continue
            if lengths is not None and len(wav) > lengths[j]:
                stats["corrupt"] = stats.get("corrupt", 0) + 1
                stats["longer_than_sidecar"] = stats.get("longer_than_sidecar", 0) + 1
                continue
            waves.append(normalize_waveform(wav) if self.options.normalize else wav)
            keys.append(key)
            texts.append(fields["txt"].decode("utf-8") if "txt" in fields else None)
        if not waves:
            return None
        batch = collate_audio(waves, keys, pad=self.options.pad, max_sample_size=self.options.max_sample_size,
                              mask_fn=self.mask_fn, generator=generator, conv_layers=self.options.conv_layers,
                              length_multiple=self.options.length_multiple)
        batch.extras["transcripts"] = texts
        return batch

    def filler(self, generator: torch.Generator) -> Batch:
        length = max(self.options.min_sample_size, min_samples_for_frames(1, self.options.conv_layers))
        batch = collate_audio([np.zeros(length, np.float32)], ["<filler>"], pad=self.options.pad,
                              max_sample_size=self.options.max_sample_size, mask_fn=self.mask_fn,
                              generator=generator, conv_layers=self.options.conv_layers)
        batch.extras["transcripts"] = [None]
        return batch


def audio_train_loader(pattern: str | Sequence[str], options: AudioLoaderOptions,
                       mask_fn: MaskFn | None = None, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                       num_workers: int = 0, prefetch_factor: int = 2) -> TrainLoader:
    """The training loader of one rank over the shards of `pattern` (brace-expanded)."""
    index = load_index(expand_pattern(pattern), options.lengths_file)
    return TrainLoader(index, options.batching(), AudioBatchMaker(options, mask_fn), seed=seed, rank=rank,
                       world_size=world_size, num_workers=num_workers, prefetch_factor=prefetch_factor)


def audio_validation_loader(pattern: str | Sequence[str], options: AudioLoaderOptions,
                            mask_fn: MaskFn | None = None, *, seed: int = 0, rank: int = 0,
                            world_size: int = 1, num_workers: int = 0) -> ValidationLoader:
    """The validation loader of one rank: a fixed list of batches, `steps` on every rank."""
    index = load_index(expand_pattern(pattern), options.lengths_file)
    return ValidationLoader(index, options.batching(), AudioBatchMaker(options, mask_fn), seed=seed,
                            rank=rank, world_size=world_size, num_workers=num_workers)
