"""Analytic FLOP counts (DESIGN.md 6): matmuls and convolutions at 2 FLOPs per multiply-add;
norms, activations and softmax are not counted. Training = student forward + backward (3x the
forward) + the teacher's forward. The audio CNN counts (about a third of the audio forward).
Profilers that patch torch.nn.functional miss Triton kernels, so d2v reports these numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

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
    """Forward FLOPs of the regression head at the masked positions."""
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
    mk = cfg.masking
    masked = expected_span_rate(mk.mask_prob, mk.mask_length) * t
    return FlopCount(0.0, 0.0, blocks, head_flops(cfg, masked), blocks)


def flops_per_sample(cfg: D2vConfig, seconds: float = 1.0) -> FlopCount:
    """Audio: per utterance of `seconds`; image: per image; text: per max_positions-token sequence."""
    if cfg.model.modality == "audio":
        return audio_flops(cfg, int(round(seconds * cfg.model.audio.sample_rate)))
    if cfg.model.modality == "image":
        return image_flops(cfg)
    if cfg.model.modality == "text":
        return text_flops(cfg)
    raise ValueError(f"no FLOP count for modality {cfg.model.modality!r}")
