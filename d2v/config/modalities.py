"""What the configuration layer knows about each modality, in one place: the per-rank batch
setting and its unit, what one encoder position is, how many positions an input has, the extra
tokens, the mask kinds of 1.0 and 2.0 and what a 2.0 teacher reads. Batch planning, validation,
attention planning, the run log and the estimates ask the spec instead of testing the modality.
A new modality adds its spec here (its model, data and interop parts live in their own layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from d2v.shapes import conv_output_length


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    batch_key: str
    """The per-rank batch setting a reference batch is split into."""
    batch_unit: str
    """What `train.reference_batch` counts."""
    position_name: str
    """What one encoder position is (the run log's throughput unit)."""
    masks: tuple[str, ...]
    """1.0 mask kinds (masking.kind)."""
    masks_v2: tuple[str, ...]
    """2.0 mask kinds: exact counts per row so kept tokens gather densely (docs/method.md §3.3)."""
    teacher_input_v2: str
    """teacher.input a 2.0 model needs: the student's features, or the raw source."""
    v2_count: str
    """Which count a 2.0 mask fixes exactly per row: 'masked' (int(T·R)) or 'kept' (int(T·(1−R)))."""
    positions: Callable
    """positions(model_cfg, samples) -> encoder positions of one input (samples: waveform length, for
    inputs whose length varies; None elsewhere)."""
    padded: bool
    """Whether rows of a batch can be padded (every image has the same number of patches)."""
    varies_in_length: bool
    """Whether inputs differ in length, so that the per-rank batch is a budget of input samples
    (waveform samples, like fairseq's max_tokens) rather than a count of rows."""
    grid_decoder: bool
    """Whether the 2.0 decoder convolves over a 2-D grid of positions."""
    cls_token_v1: bool
    """Whether the 1.0 encoder prepends a CLS token (BEiT's layout, docs/method.md §2.2)."""
    v2_options: frozenset[str]
    """The 2.0 position options (model.v2.*) this modality's encoder has."""
    checks: Callable
    """checks(cfg) -> problems of settings only this modality reads (messages say what to change)."""
    grid: Callable = lambda m: None
    """grid(model_cfg) -> (rows, columns) of the positions where they form a 2-D grid (2-D masks), else None."""
    learned_attention_bias: Callable = lambda m: False
    """learned_attention_bias(model_cfg): whether the student adds a learned bias to its attention
    scores, decided as the model builder decides it (the planned kernels then take that bias)."""

    def per_rank_batch(self, cfg) -> int:
        return _get(cfg, self.batch_key)

    def smallest_per_rank_batch(self, cfg) -> int:
        """The least a rank's micro-batch can be: one input; for inputs whose length varies, a
        budget that holds one crop of the longest length the loader keeps (data.max_sample_size).
        A smaller budget still gets one such utterance per batch (a batch holds at least one), so
        the run would train more, and use more memory, than the plan says."""
        return cfg.data.max_sample_size if self.varies_in_length else 1

    def set_per_rank_batch(self, cfg, value: int) -> None:
        section, _, field = self.batch_key.partition(".")
        setattr(getattr(cfg, section), field, value)

    def max_attention_length(self, cfg) -> int:
        """The longest self-attention sequence (extra tokens such as CLS included)."""
        return self.positions(cfg.model, cfg.data.max_sample_size) + extra_tokens(cfg.model)

    def seconds(self, cfg, length: int) -> float | None:
        """Seconds of input in a source row of `length` (inputs whose length varies), else None."""
        return length / cfg.model.audio.sample_rate if self.varies_in_length else None


def _get(cfg, key: str) -> int:
    section, _, field = key.partition(".")
    return getattr(getattr(cfg, section), field)


def extra_tokens(m) -> int:
    """Tokens the encoder prepends (CLS): 1.0 where the modality's layout has one, 2.0 where
    model.v2.cls_token."""
    if m.v2.enabled:
        return 1 if m.v2.cls_token else 0
    return 1 if modality_spec(m.modality).cls_token_v1 else 0


def _audio_positions(m, samples):
    return conv_output_length(samples, m.audio.conv_layers)


def _image_grid(m):
    side = m.image.image_size // m.image.patch_size
    return side, side


def _image_positions(m, samples):
    rows, columns = _image_grid(m)
    return rows * columns


def _beit_bias(m) -> bool:
    # 1.0 vision builds BEiT's shared relative position bias on request; the 2.0 one has sin-cos positions.
    return not m.v2.enabled and m.image.rel_pos_bias


def _text_positions(m, samples):
    return m.text.max_positions


def _audio_checks(cfg) -> list[str]:
    m, p = cfg.model, []
    if m.embed_dim % m.audio.conv_pos_groups:
        p.append(f"model.embed_dim={m.embed_dim} is not divisible by model.audio.conv_pos_groups={m.audio.conv_pos_groups}")
    if m.v2.enabled and cfg.data.pad:
        p.append("2.0 audio masks need equal-length rows: set data.pad=false (batches are cropped to the shortest)")
    return p


def _image_checks(cfg) -> list[str]:
    m, mk, p = cfg.model, cfg.masking, []
    im = m.image
    patches = _image_positions(m, None)
    if im.image_size % im.patch_size:
        p.append(f"model.image.image_size={im.image_size} is not a multiple of model.image.patch_size={im.patch_size}")
    elif not m.v2.enabled and mk.num_mask_patches > patches:
        p.append(f"masking.num_mask_patches={mk.num_mask_patches} exceeds the {patches} patches")
    if not m.v2.enabled and cfg.teacher.input != "source":
        p.append("image models need teacher.input=source (the teacher has its own patch embedding)")
    if m.v2.enabled and im.rel_pos_bias:
        p.append("image 2.0 uses sin-cos positions: set model.image.rel_pos_bias=false")
    if m.v2.enabled and patches * (1.0 - mk.mask_prob) < 1:
        p.append(f"masking.mask_prob={mk.mask_prob} keeps no patch: lower it")
    return p


def _text_checks(cfg) -> list[str]:
    t = cfg.model.text
    if not 0 <= t.pad_id < t.vocab_size:
        return [f"model.text.pad_id={t.pad_id} is outside the vocabulary of {t.vocab_size}"]
    return []


SPECS = {
    "audio": ModalitySpec("audio", "data.max_samples_per_batch", "waveform samples", "frames", ("span",),
                          ("block_1d",), "features", "masked", _audio_positions, padded=True, varies_in_length=True,
                          grid_decoder=False, cls_token_v1=False, v2_options=frozenset({"alibi"}), checks=_audio_checks),
    "image": ModalitySpec("image", "train.micro_batch_size", "images", "patches", ("block_2d",),
                          ("inverse_block_2d",), "source", "kept", _image_positions, padded=False, varies_in_length=False,
                          grid_decoder=True, cls_token_v1=True, v2_options=frozenset({"sincos_positions"}), checks=_image_checks,
                          grid=_image_grid, learned_attention_bias=_beit_bias),
    "text": ModalitySpec("text", "train.micro_batch_size", "sequences", "tokens", ("text_span", "bert"),
                         ("random",), "features", "kept", _text_positions, padded=True, varies_in_length=False,
                         grid_decoder=False, cls_token_v1=False, v2_options=frozenset(), checks=_text_checks),
}


def modality_spec(modality: str) -> ModalitySpec:
    try:
        return SPECS[modality]
    except KeyError:
        raise ValueError(f"unknown modality {modality!r}; use one of {sorted(SPECS)}") from None
