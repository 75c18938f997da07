"""The typed config tree: one dataclass per section, a one-line doc under every field.

Standard library only (the dependency direction: config imports nothing of d2v). Presets live in `presets.py`, YAML and
`key=value` overrides in `overrides.py`, the DeepSpeed JSON filler in `deepspeed_json.py`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class FrozenConfigError(AttributeError):
    """A component tried to change the resolved run config."""


class Section:
    """Base of every config section: editable while a config is put together (preset, YAML,
    overrides, an import's settings), read-only once `freeze` has made it a run's config, so that
    no component can change a value another component already read."""

    _frozen = False

    def __setattr__(self, name: str, value) -> None:
        if self._frozen:
            raise FrozenConfigError(
                f"the run config is resolved: {type(self).__name__}.{name} cannot change any more; set it in the "
                f"preset, the YAML file or a key=value override")
        object.__setattr__(self, name, value)


def freeze(cfg: Section) -> Section:
    """Makes `cfg` and every section under it read-only; returns it."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Section):
            freeze(value)
    object.__setattr__(cfg, "_frozen", True)
    return cfg


def is_frozen(cfg: Section) -> bool:
    return cfg._frozen


@dataclass(kw_only=True)
class AudioFeatureConfig(Section):
    """The waveform encoder and the convolutional positional encoder (docs/method.md §3.2, audio)."""

    conv_layers: tuple[tuple[int, int, int], ...] = (
        (512, 10, 5), (512, 3, 2), (512, 3, 2), (512, 3, 2), (512, 3, 2), (512, 2, 2), (512, 2, 2),
    )
    """(channels, kernel, stride) per conv layer; 320x downsampling: 16,000 samples -> 49 frames."""
    conv_pos_depth: int = 5
    """Number of positional conv layers (transformers' `num_conv_pos_embeddings`)."""
    conv_pos_kernel: int = 19
    """Kernel width of each positional conv layer (transformers' `conv_pos_kernel_size`)."""
    conv_pos_groups: int = 16
    """Groups of each positional conv layer."""
    sample_rate: int = 16_000
    """Waveform sample rate the model expects (Hz)."""


@dataclass(kw_only=True)
class ImageFeatureConfig(Section):
    """Patch embedding and BEiT-style positions (docs/method.md §3.2, vision)."""

    image_size: int = 224
    """Input height and width in pixels."""
    patch_size: int = 16
    """Patch height and width; image_size / patch_size patches per side."""
    in_chans: int = 3
    """Input channels."""
    layer_scale_init: float = 1e-4
    """Initial value of the per-block layer-scale vectors (0 disables layer scale)."""
    drop_path: float = 0.25
    """Stochastic-depth rate, rising linearly over the blocks to this value."""
    rel_pos_bias: bool = True
    """A relative position bias shared by all blocks (BEiT; the only position signal)."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean used to normalise pixels (ImageNet)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel std used to normalise pixels (ImageNet)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Random resized crop: range of the crop's area as a fraction of the image (BEiT 0.08-1; 2.0 0.2-1, MAE)."""
    color_jitter: float = 0.4
    """Brightness, contrast and saturation jitter strength, applied before flip and crop (BEiT 0.4; 0 disables, 2.0)."""


@dataclass(kw_only=True)
class TextFeatureConfig(Section):
    """Token embedding in the RoBERTa layout (docs/method.md §3.2, §8)."""

    vocab_size: int = 50_265
    """Embedding rows, `<mask>` (the last id) included."""
    max_positions: int = 512
    """Longest sequence; the position table has max_positions + pad_id + 1 rows (RoBERTa counts from the pad id)."""
    pad_id: int = 1
    """Padding token id (`<pad>`); positions are counted from it."""
    bos_id: int = 0
    """`<s>` id."""
    eos_id: int = 2
    """`</s>` id."""
    unk_id: int = 3
    """`<unk>` id."""


@dataclass(kw_only=True)
class KeptTokensConfig(Section):
    """The kept-token student of data2vec 2.0 (docs/method.md §3.3): it drops the masked positions
    instead of filling them with a learned embedding, encodes M masked clones of every sample
    against one teacher pass, and predicts with a conv decoder. The section is `model.v2`."""

    enabled: bool = False
    """Build the 2.0 student (kept tokens only, multi-mask, conv decoder) and pick the 2.0 task."""
    num_masks: int = 8
    """Clones M of every sample, each with its own mask (audio 8, image 16, text 8); the teacher runs once per sample."""
    prenet_depth: int = 0
    """Blocks before the main blocks, not tapped for targets (image 2, audio large 8); model.depth counts the main blocks."""
    alibi: bool = False
    """ALiBi attention bias with a learned per-head scale (audio), gathered at the kept positions."""
    alibi_scale_init: float = 1.0
    """Initial value of the learned per-head ALiBi scale (clamped at >= 0 in use, never weight-decayed)."""
    sincos_positions: bool = False
    """Fixed 2-D sin-cos patch positions added before masking (image)."""
    cls_token: bool = False
    """A learned CLS token prepended to the kept tokens (image)."""
    cls_loss: float = 0.0
    """Weight of the CLS loss: the CLS output regresses the mean target over patches (image 0.01; 0 disables)."""
    mask_noise_std: float = 0.01
    """Std of the Gaussian noise the decoder sees in masked slots."""
    decoder_dim: int = 384
    """Width of the conv decoder."""
    decoder_kernel: int = 7
    """Kernel size of each decoder conv (1-D for audio/text, k×k for image)."""
    decoder_layers: int = 4
    """Decoder conv layers: Conv -> LayerNorm(no affine) -> GELU."""
    decoder_groups: int = 16
    """Groups of each decoder conv."""
    decoder_residual: bool = True
    """Residual connections around decoder layers whose input and output widths match (text: none)."""
    decoder_projection_layers: int = 1
    """Linear layers after the convs: 1 (Linear to D) or 2 (Linear to 2x width, GELU, Linear to D; text)."""
    decoder_input_dropout: float = 0.1
    """Dropout on the encoder output before the decoder (audio, text 0.1; image 0)."""


@dataclass(kw_only=True)
class ModelConfig(Section):
    """The student: feature encoder, shared Transformer encoder and regression head."""

    modality: str = "audio"
    """Which feature encoder to build: audio | image | text."""
    embed_dim: int = 768
    """Width D of the Transformer encoder."""
    depth: int = 12
    """Number of Transformer blocks L."""
    num_heads: int = 12
    """Attention heads per block."""
    ffn_dim: int = 3072
    """Hidden width of each block's feed-forward sub-layer."""
    layer_norm_first: bool = False
    """Pre-LN blocks (vision 1.0) instead of post-LN (audio, text, all of 2.0)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon inside the encoder (vision 1.0 uses 1e-6)."""
    dropout: float = 0.1
    """Dropout on block outputs (after attention and after the FFN) and on the encoder input."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (inside the attention kernel)."""
    activation_dropout: float = 0.0
    """Dropout after the FFN activation."""
    feature_dropout: float = 0.0
    """Dropout on the projected features before masking (fairseq's dropout_input); the teacher sees them before it."""
    layerdrop: float = 0.05
    """Probability of skipping a whole block in training (drawn identically on every rank)."""
    head: str = "linear"
    """Regression head: linear (D->D) | mlp (D->2D->GELU->D, text 1.0)."""
    init_std: float = 0.02
    """Std of the normal initialisation of linear and embedding weights (BERT init)."""
    audio: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    """Audio feature-encoder settings (used when modality is audio)."""
    image: ImageFeatureConfig = field(default_factory=ImageFeatureConfig)
    """Image feature-encoder settings (used when modality is image)."""
    text: TextFeatureConfig = field(default_factory=TextFeatureConfig)
    """Text feature-encoder settings (used when modality is text)."""
    v2: KeptTokensConfig = field(default_factory=KeptTokensConfig)
    """data2vec 2.0 settings (used when v2.enabled)."""

    @property
    def drops_masked(self) -> bool:
        """Whether the student drops the masked positions (kept-token encoder, conv decoder, M clones)
        instead of filling them with a learned embedding: the data2vec 2.0 student (model.v2.enabled)."""
        return self.v2.enabled

    @property
    def clones(self) -> int:
        """M, the masked clones of every sample: model.v2.num_masks for the kept-token student, else 1."""
        return self.v2.num_masks if self.drops_masked else 1


@dataclass(kw_only=True)
class MaskingConfig(Section):
    """How the student's view is masked; masks are made in the collate step (docs/method.md §2)."""

    kind: str = "span"
    """Mask generator: span (wav2vec 2.0, audio 1.0) | block_2d (BEiT, image 1.0) | text_span (spans of <mask>, text 1.0) | bert (15%, 80/10/10) | 2.0: block_1d (audio) | inverse_block_2d (image) | random (text)."""
    mask_prob: float = 0.65
    """Span-start probability p (span masking): p=0.65 with length 10 masks ~49% of frames; 2.0 masks: the masked fraction R."""
    block_width: int = 5
    """2.0 block masks: block width B (1-D spans of B frames; 2-D B×B squares, of kept patches for inverse_block_2d)."""
    mask_adjust: float = 0.05
    """2.0 block masks: extra block centres drawn (fraction) before trimming to exactly int(T·R) masked."""
    mask_length: int = 10
    """Span length in frames."""
    min_masks: int = 1
    """Minimum number of spans per row."""
    equalize: str | None = "min"
    """Equal masked counts per row: min (the reference: trim to the batch minimum) | target (hit round(p_eff*T)) | None."""
    num_mask_patches: int = 120
    """block_2d: patches to mask per image (120 of 196 in the reference)."""
    min_block_patches: int = 16
    """block_2d: smallest block, in patches."""
    max_block_patches: int | None = None
    """block_2d: largest block, in patches (None: no limit beyond the target)."""
    min_aspect: float = 0.3
    """block_2d: blocks have aspect ratios in [min_aspect, 1/min_aspect]."""
    top_up: bool = True
    """block_2d: add random patches when the block generator stops short, so every image has exactly num_mask_patches."""
    random_token_prob: float = 0.0
    """Text: fraction of selected tokens replaced by a random token (bert: 0.1)."""
    leave_unmasked_prob: float = 0.0
    """Text: fraction of selected tokens left unchanged (bert: 0.1); the loss still covers them."""


@dataclass(kw_only=True)
class TeacherConfig(Section):
    """The EMA teacher: what it tracks, its decay schedule and its targets (docs/method.md §3.1)."""

    ema_start: float = 0.999
    """EMA decay tau at update 0."""
    ema_end: float = 0.9999
    """EMA decay after `ema_anneal_steps` updates (1.0 freezes the teacher)."""
    ema_anneal_steps: int = 30_000
    """Updates over which tau rises linearly from ema_start to ema_end."""
    ema_modules: tuple[str, ...] = ("encoder.layer_norm", "encoder.blocks")
    """Student sub-modules the teacher averages (EMA, fp32)."""
    copy_modules: tuple[str, ...] = ("encoder.pos_conv",)
    """Student sub-modules copied into the teacher after every update (shared, not averaged)."""
    input: str = "features"
    """What the teacher consumes: features (the student's detached, unmasked feature-encoder output) | source (raw input, own feature encoder)."""
    top_k: int = 8
    """Number K of top blocks whose outputs are averaged into the target."""
    tap: str = "ffn"
    """Which block output is the target: ffn (the FFN output before dropout/residual/LN) | block (end of block, vision 1.0)."""
    layer_norm: str | None = "instance"
    """Parameter-free norm of each tapped output: instance (over time) | layer (over channels) | None."""
    final_norm: str | None = None
    """Norm applied after averaging: instance | layer | None."""
    offload: str = "none"
    """Where the teacher's weights live: none (with the student) | cpu (host memory, streamed layer by layer)."""


@dataclass(kw_only=True)
class LossConfig(Section):
    """The regression loss at masked positions (docs/method.md §3.1 step 4)."""

    kind: str = "l2"
    """Per-element loss: l2 | smooth_l1."""
    beta: float = 0.0
    """Smooth-L1 transition point (ignored for l2)."""
    scale: float | None = None
    """Multiplier of the per-position loss; None means 1/sqrt(D)."""
    reduction: str = "sum_per_position"
    """sum_per_position: sum over D, divided by the (all-reduced) number of masked positions | mean: mean over all elements."""
    min_target_std: float = 0.1
    """Collapse guard: abort when the target std falls below this after `guard_after` updates (0 disables)."""
    min_pred_std: float = 0.01
    """Collapse guard: abort when the prediction std falls below this after `guard_after` updates (0 disables)."""
    guard_after: int = 5_000
    """Updates before the collapse guard is armed."""


@dataclass(kw_only=True)
class OptimConfig(Section):
    """Optimizer and learning-rate schedule (filled into the DeepSpeed JSON)."""

    lr: float = 5e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    eps: float = 1e-6
    """Adam epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""
    no_decay_1d: bool = False
    """Exempt biases, norms and other 1-D parameters from weight decay (data2vec 2.0)."""
    schedule: str = "tri_stage"
    """LR schedule: tri_stage | cosine | constant | polynomial (fairseq's polynomial_decay, power 1)."""
    warmup_steps: int = 0
    """Linear warmup updates for cosine/constant/polynomial (tri_stage uses phase_ratios)."""
    phase_ratios: tuple[float, float, float] = (0.03, 0.90, 0.07)
    """Tri-stage warmup/hold/decay fractions of max_steps."""
    init_lr_scale: float = 0.01
    """Tri-stage: LR at step 0 as a fraction of the peak."""
    final_lr_scale: float = 0.01
    """Tri-stage: LR at the end as a fraction of the peak (cosine decays to min_lr)."""
    min_lr: float = 0.0
    """Cosine, polynomial: LR at the end of the schedule."""
    clip_norm: float = 0.0
    """Gradient clipping by global norm (0 disables)."""
    implementation: str = "torch_fused"
    """AdamW kernel: torch_fused (torch's fused AdamW; needs no build on any node) or deepspeed
    (DeepSpeed's FusedAdam on GPUs, compiled just in time on every rank at start-up: needs nvcc
    and ninja matching torch's CUDA everywhere)."""


@dataclass(kw_only=True)
class DataConfig(Section):
    """Where batches come from and how they are shaped."""

    train_shards: str = ""
    """Brace-expanded WebDataset shard pattern for training (empty: synthetic data)."""
    val_shards: str = ""
    """Shard pattern of held-out data for the validation loss (empty: none)."""
    min_sample_size: int = 32_000
    """Audio: utterances shorter than this many samples are skipped (2 s)."""
    max_sample_size: int = 320_000
    """Audio: longer utterances are randomly cropped to this many samples (20 s)."""
    max_samples_per_batch: int = 3_800_000
    """Audio: budget of total samples per micro-batch (batch size x padded length; fairseq's max_tokens)."""
    normalize: bool = True
    """Audio: normalise each utterance to zero mean and unit variance."""
    pad: bool = False
    """Audio: pad to the longest utterance with padding masks instead of cropping to the shortest (the reference)."""
    length_multiple: int = 0
    """Audio, cropping: each batch is cut to a multiple of this many samples (0: to its shortest
    utterance, as the reference): a few batch lengths instead of one per batch, so attention plans,
    cuDNN graphs and compiled kernels are made once each; costs under this many samples per row."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    buffer_size: int = 1_000
    """Samples held in the shuffle/bucketing buffer."""
    synthetic_seconds: float = 4.0
    """Synthetic data: seconds of audio per utterance."""


@dataclass(kw_only=True)
class TrainConfig(Section):
    """The loop: steps, batches, precision, logging and checkpoints."""

    max_steps: int = 400_000
    """Optimizer updates to run."""
    micro_batch_size: int = 8
    """Samples per rank per micro-batch (nominal for audio, whose batches follow the sample budget)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer update."""
    global_batch_size: int | None = None
    """If set, must equal micro_batch_size x grad_accum x world size (checked)."""
    reference_batch: int = 0
    """Global batch per update of the reference run the preset reproduces, before the M clones: images or
    sequences, or for audio waveform samples (a budget, like fairseq's max_tokens); 0: no reference run."""
    reference_gpus: int = 0
    """GPU count of that reference run; at another world size the per-rank batch and grad_accum follow
    from reference_batch (d2v.config.batch_plan), unless train.micro_batch_size / train.grad_accum /
    data.max_samples_per_batch were set to other values than the preset's."""
    precision: str = "bf16"
    """bf16 (DeepSpeed's bf16 mode, fp32 master weights) | fp16 (dynamic loss scaling) | fp32."""
    seed: int = 1
    """Seed of parameters, data order and masks."""
    activation_checkpointing: bool = False
    """Recompute each student block in backward instead of storing its activations (less memory, ~1/3 more compute)."""
    compile: bool = False
    """torch.compile each Transformer block's forward, student and teacher (inductor: a C++ compiler on CPU,
    Triton on GPU; not with ZeRO-3, whose hooks swap the parameters under the compiled code)."""
    log_every: int = 10
    """Updates between console/JSONL log lines."""
    save_every: int = 1_000
    """Updates between checkpoints (0: only at the end)."""
    keep_last: int = 3
    """Checkpoints kept on disk."""
    val_every: int = 0
    """Updates between validation passes (0: never)."""
    out_dir: str = "runs/d2v"
    """Directory for logs, the resolved config and checkpoints."""
    threads: int = 0
    """torch intra-op threads per rank (0: leave torch's default)."""
    max_consecutive_skips: int = 10
    """Stop (with a checkpoint) after this many updates in a row were skipped for a NaN/inf loss or gradient."""
    wandb: str = "disabled"
    """wandb mode: disabled | offline | online (online only when asked; never needed)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device that MFU is logged against (0: the GPU's bf16 dense datasheet peak)."""


@dataclass(kw_only=True)
class D2vConfig(Section):
    """A whole run."""

    name: str = "audio_base"
    """Preset name this config started from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The student."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """The student's masked view."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The EMA teacher and its targets."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The regression loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""

    def validate(self) -> "D2vConfig":
        """Raises ValueError listing everything that contradicts itself; returns self."""
        from d2v.config.validate import validate

        validate(self)
        return self
