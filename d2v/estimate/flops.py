"""Analytic FLOP counts (docs/method.md §6): matmuls and convolutions at 2 FLOPs per multiply-add;
norms, activations and softmax are not counted. Training = student forward + backward (3x the
forward) + the teacher's forward. The audio CNN counts (about a third of the audio forward).
Profilers that patch torch.nn.functional miss Triton kernels, so d2v reports these numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from d2v.config.mask_kinds import mask_config
from d2v.config.modalities import modality_spec
from d2v.config.schema import D2vConfig
from d2v.masking.span import expected_span_rate
from d2v.shapes import conv_output_length


@dataclass
class FlopCount:
    feature_encoder: float
    """Forward FLOPs of the modality feature encoder (audio: CNN + projection)."""
    positions: float
    """Forward FLOPs of the positional encoder (audio: the positional convs)."""
    blocks: float
    """Forward FLOPs of the Transformer blocks (projections, FFN, attention scores and values)."""
    head: float
    """Forward FLOPs of the regression head at the masked positions (2.0: the conv decoder, all positions, M clones)."""
    teacher_forward: float
    """FLOPs of the teacher's forward (what it runs of the model, on the clean input)."""

    @property
    def student_forward(self) -> float:
        return self.feature_encoder + self.positions + self.blocks + self.head

    @property
    def train_step(self) -> float:
        return 3.0 * self.student_forward + self.teacher_forward

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.update(student_forward=self.student_forward, train_step=self.train_step)
        return d


def block_flops(tokens: int, dim: int, ffn: int) -> float:
    """One Transformer block over `tokens` positions: q,k,v,out (8TD^2), FFN (4TDF), attention (4T^2D)."""
    return 8.0 * tokens * dim * dim + 4.0 * tokens * dim * ffn + 4.0 * tokens * tokens * dim


def head_flops(cfg: D2vConfig, positions: float) -> float:
    d = cfg.model.embed_dim
    if cfg.model.head == "mlp":
        return positions * (2.0 * d * 2 * d * 2)
    return positions * 2.0 * d * d


def audio_flops(cfg: D2vConfig, num_samples: int) -> FlopCount:
    """Per utterance of `num_samples` waveform samples."""
    m, a = cfg.model, cfg.model.audio
    n, c_in, cnn = num_samples, 1, 0.0
    for c_out, kernel, stride in a.conv_layers:
        n = (n - kernel) // stride + 1
        cnn += 2.0 * c_in * c_out * kernel * n
        c_in = c_out
    frames = conv_output_length(num_samples, a.conv_layers)
    feature = cnn + 2.0 * c_in * m.embed_dim * frames
    pos = a.conv_pos_depth * 2.0 * (m.embed_dim // a.conv_pos_groups) * m.embed_dim * a.conv_pos_kernel * frames
    blocks = m.depth * block_flops(frames, m.embed_dim, m.ffn_dim)
    masked = expected_span_rate(cfg.masking.mask_prob, cfg.masking.mask_length) * frames
    teacher = blocks + (pos if "encoder.pos_conv" in cfg.teacher.copy_modules + cfg.teacher.ema_modules else 0.0)
    if cfg.teacher.input == "source":
        teacher += feature
    return FlopCount(feature, pos, blocks, head_flops(cfg, masked), teacher)


def image_flops(cfg: D2vConfig) -> FlopCount:
    """Per image: patch embedding, blocks over patches + CLS, head at the masked patches."""
    m, im = cfg.model, cfg.model.image
    patches = (im.image_size // im.patch_size) ** 2
    feature = 2.0 * im.in_chans * im.patch_size**2 * m.embed_dim * patches
    blocks = m.depth * block_flops(patches + 1, m.embed_dim, m.ffn_dim)
    teacher = blocks + (feature if cfg.teacher.input == "source" else 0.0)
    return FlopCount(feature, 0.0, blocks, head_flops(cfg, cfg.masking.num_mask_patches), teacher)


def text_flops(cfg: D2vConfig, tokens: int | None = None) -> FlopCount:
    """Per sequence of `tokens` (default max_positions): embeddings are look-ups (0 FLOPs)."""
    m = cfg.model
    t = tokens if tokens is not None else m.text.max_positions
    blocks = m.depth * block_flops(t, m.embed_dim, m.ffn_dim)
    kind = mask_config(cfg.masking)  # BERT's selection is spans of one token
    masked = expected_span_rate(kind.mask_prob, kind.mask_length) * t
    return FlopCount(0.0, 0.0, blocks, head_flops(cfg, masked), blocks)


def kept_per_clone(cfg: D2vConfig, length: int) -> int:
    """2.0: tokens each clone's student encodes (extra tokens not counted): audio masks exactly
    int(T·R), image and text keep exactly int(T·(1−R)) (d2v.masking.exact_count)."""
    R = cfg.masking.mask_prob
    if modality_spec(cfg.model.modality).v2_count == "masked":
        return length - int(length * R)
    return int(length * (1.0 - R))


def student_tokens_per_sample(cfg: D2vConfig, length: int) -> int:
    """Positions the student's blocks encode per original sample: all T (1.0), or M clones' kept tokens (2.0)."""
    v = cfg.model.v2
    if not v.enabled:
        return length
    return v.num_masks * (kept_per_clone(cfg, length) + (1 if v.cls_token else 0))


def decoder_flops(cfg: D2vConfig, positions: int) -> float:
    """The 2.0 conv decoder over all `positions` of one clone: grouped convs, then the projection."""
    m, v = cfg.model, cfg.model.v2
    taps = v.decoder_kernel ** (2 if modality_spec(m.modality).grid_decoder else 1)
    convs, c_in = 0.0, m.embed_dim
    for _ in range(v.decoder_layers):
        convs += 2.0 * (c_in // v.decoder_groups) * v.decoder_dim * taps * positions
        c_in = v.decoder_dim
    if v.decoder_projection_layers == 1:
        proj = 2.0 * c_in * m.embed_dim * positions
    else:
        proj = 2.0 * (c_in * 2 * c_in + 2 * c_in * m.embed_dim) * positions
    return convs + proj


def v2_flops(cfg: D2vConfig, seconds: float = 1.0) -> FlopCount:
    """data2vec 2.0 per original sample (docs/method.md §3.3): the feature encoder once; positions, blocks
    over the kept tokens (+ CLS) and the decoder over all positions M times; the teacher once over
    the full sequence. `head` holds the decoder."""
    m, v = cfg.model, cfg.model.v2
    M, depth, extra = v.num_masks, v.prenet_depth + m.depth, 1 if v.cls_token else 0
    spec = modality_spec(m.modality)
    T = spec.positions(m, _samples(cfg, seconds) if spec.varies_in_length else None)
    feature, pos = _counter(cfg).v2_encoders(cfg, seconds)
    kept = kept_per_clone(cfg, T)
    blocks = M * depth * block_flops(kept + extra, m.embed_dim, m.ffn_dim)
    teacher = depth * block_flops(T + extra, m.embed_dim, m.ffn_dim) + pos
    if cfg.teacher.input == "source":
        teacher += feature
    return FlopCount(feature, M * pos, blocks, M * decoder_flops(cfg, T), teacher)


def _samples(cfg: D2vConfig, seconds: float) -> int:
    return int(round(seconds * cfg.model.audio.sample_rate))


def _audio_v1(cfg: D2vConfig, seconds: float) -> FlopCount:
    return audio_flops(cfg, _samples(cfg, seconds))


def _image_v1(cfg: D2vConfig, seconds: float) -> FlopCount:
    return image_flops(cfg)


def _text_v1(cfg: D2vConfig, seconds: float) -> FlopCount:
    return text_flops(cfg)


def _audio_v2_encoders(cfg: D2vConfig, seconds: float) -> tuple[float, float]:
    one = audio_flops(cfg, _samples(cfg, seconds))
    return one.feature_encoder, one.positions


def _image_v2_encoders(cfg: D2vConfig, seconds: float) -> tuple[float, float]:
    return image_flops(cfg).feature_encoder, 0.0


def _text_v2_encoders(cfg: D2vConfig, seconds: float) -> tuple[float, float]:
    return 0.0, 0.0  # embeddings are look-ups, positions included


@dataclass(frozen=True)
class ModalityFlops:
    """A modality's FLOP formulas; `seconds` sizes inputs whose length varies, the others ignore it."""

    v1: Callable[[D2vConfig, float], FlopCount]
    """The whole 1.0 count per sample."""
    v2_encoders: Callable[[D2vConfig, float], tuple[float, float]]
    """2.0: (feature encoder, positional encoder) forward FLOPs per sample."""


COUNTERS: dict[str, ModalityFlops] = {
    "audio": ModalityFlops(_audio_v1, _audio_v2_encoders),
    "image": ModalityFlops(_image_v1, _image_v2_encoders),
    "text": ModalityFlops(_text_v1, _text_v2_encoders),
}


def _counter(cfg: D2vConfig) -> ModalityFlops:
    try:
        return COUNTERS[cfg.model.modality]
    except KeyError:
        raise ValueError(f"no FLOP count for modality {cfg.model.modality!r}") from None


def flops_per_sample(cfg: D2vConfig, seconds: float = 1.0) -> FlopCount:
    """Audio: per utterance of `seconds`; image: per image; text: per max_positions-token sequence."""
    if cfg.model.drops_masked:
        return v2_flops(cfg, seconds)
    return _counter(cfg).v1(cfg, seconds)
