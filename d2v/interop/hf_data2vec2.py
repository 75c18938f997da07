"""data2vec 2.0 encoders for transformers: the modelling file `export --format hf` copies into a
2.0 audio or image export as modeling_data2vec2.py (config.json's `auto_map` names its classes).

Self-contained on purpose: it imports only torch, numpy, PIL and transformers (and, to read an
audio file given to the pipeline, soundfile where installed, else the standard library), never d2v, so
`AutoModel.from_pretrained(OUT, trust_remote_code=True)` works where d2v is not installed. It
repeats d2v's encoder (d2v/models) operation for operation, so that in fp32 eval mode it returns
what d2v's encoder returns bit for bit (tests/test_hf_v2.py checks it from outside the checkout).
Weight names are d2v's student names (frontend.*, encoder.*). The fixed tensors (ALiBi slopes,
sin-cos table) are stored with the weights; they are also computed here so that a model built
from its config alone has them.

Also here: the preprocessing d2v applied in pretraining (a feature extractor that normalises each
utterance as d2v's loader does, an image processor that resizes and normalises as d2v's
evaluation transform does) and `feature-extraction` pipelines for both. Attention weights are not
returned (torch's fused attention computes none); gradient checkpointing recomputes each block.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel, Wav2Vec2FeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import to_channel_dimension_format
from transformers.image_utils import (ChannelDimension, infer_channel_dimension_format, is_valid_image,
                                      make_flat_list_of_images, to_numpy_array)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.pipelines import ImageFeatureExtractionPipeline, Pipeline


class Data2Vec2Config(PretrainedConfig):
    """A data2vec 2.0 encoder: `modality` 'audio' (waveform CNN, conv positions, ALiBi) or 'image'
    (patches, sin-cos positions, CLS token); post-LN Transformer blocks, `num_prenet_layers`
    of them first, then `num_hidden_layers`."""

    model_type = "data2vec2"

    def __init__(self, modality: str = "audio", hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_prenet_layers: int = 0, num_attention_heads: int = 12, intermediate_size: int = 3072,
                 layer_norm_eps: float = 1e-5, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                 activation_dropout: float = 0.0, conv_layers: list | None = None, conv_pos_depth: int = 5,
                 conv_pos_kernel: int = 19, conv_pos_groups: int = 16, alibi: bool = True,
                 image_size: int = 224, patch_size: int = 16, num_channels: int = 3, sincos_positions: bool = True,
                 cls_token: bool = True, initializer_range: float = 0.02, **kwargs) -> None:
        self.modality = modality
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_prenet_layers = num_prenet_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.conv_layers = [list(c) for c in (conv_layers or [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2)]
        self.conv_pos_depth = conv_pos_depth
        self.conv_pos_kernel = conv_pos_kernel
        self.conv_pos_groups = conv_pos_groups
        self.alibi = alibi
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.sincos_positions = sincos_positions
        self.cls_token = cls_token
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


# -- positions ---------------------------------------------------------------------------------

def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's geometric slopes 2^(-8i/n) for the largest power of two n <= heads, the rest every
    other slope of the 2n sequence."""
    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    n = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(n)
    if n < num_heads:
        slopes += geometric(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


def sincos_table(grid: int, dim: int) -> Tensor:
    """(grid²)×dim fixed 2-D sin-cos positions (MAE order: column half first, then row half)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")

    def embed(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(xs), embed(ys)], dim=1).float()


class AlibiScale(nn.Module):
    """Learned per-head scales (clamped at >= 0) over the fixed slopes."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_heads))
        self.register_buffer("slopes", alibi_slopes(num_heads))

    def forward(self, length: int) -> Tensor:
        """1×H×T×T additive bias -|i - j|·slope·scale."""
        coef_H = self.slopes.float() * self.scale.clamp_min(0.0).float()
        pos = torch.arange(length, device=coef_H.device)
        dist = (pos[:, None] - pos[None, :]).abs().float()[None, None]
        return -dist * coef_H[None, :, None, None]


class SinCosPositions(nn.Module):
    def __init__(self, grid: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("table", sincos_table(grid, dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        return x_BTD + self.table.to(x_BTD.dtype)


class ClsToken(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        return torch.cat([self.weight.expand(x_BTD.shape[0], -1, -1).to(x_BTD.dtype), x_BTD], dim=1)


class PosConvLayer(nn.Module):
    """Grouped same-length Conv1d -> LayerNorm without affine -> GELU."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0
        self.layer_norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=False)

    def forward(self, x_BDT: Tensor) -> Tensor:
        x = self.conv(x_BDT)
        if self.trim:
            x = x[..., : -self.trim]
        return F.gelu(self.layer_norm(x.transpose(1, 2)).transpose(1, 2))


class ConvPositions(nn.Module):
    def __init__(self, dim: int, depth: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PosConvLayer(dim, kernel, groups) for _ in range(depth))

    def forward(self, x_BTD: Tensor, padding_BT: Tensor | None) -> Tensor:
        if padding_BT is not None:
            x_BTD = x_BTD.masked_fill(padding_BT.unsqueeze(-1), 0.0)
        x = x_BTD.transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)


# -- feature encoders --------------------------------------------------------------------------

class ConvLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=False)
        self.layer_norm = nn.LayerNorm(c_out, eps=1e-5)

    def forward(self, x_BCS: Tensor) -> Tensor:
        return F.gelu(self.layer_norm(self.conv(x_BCS).transpose(1, 2)).transpose(1, 2))


class AudioFrontend(nn.Module):
    """Waveform B×S -> B×T×D: strided convs, LayerNorm, Linear."""

    def __init__(self, conv_layers: list, dim: int) -> None:
        super().__init__()
        self.spec = [tuple(int(v) for v in c) for c in conv_layers]
        layers, c_in = [], 1
        for c_out, kernel, stride in self.spec:
            layers.append(ConvLayer(c_in, c_out, kernel, stride))
            c_in = c_out
        self.conv_layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(c_in, eps=1e-5)
        self.projection = nn.Linear(c_in, dim)

    def num_frames(self, samples: int) -> int:
        for _, kernel, stride in self.spec:
            samples = (samples - kernel) // stride + 1
        return samples

    def forward(self, x_BS: Tensor) -> Tensor:
        x = x_BS.unsqueeze(1)
        for layer in self.conv_layers:
            x = layer(x)
        return self.projection(self.layer_norm(x.transpose(1, 2)))


class PatchFrontend(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.projection(images).flatten(2).transpose(1, 2)


# -- Transformer -------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x_BTD: Tensor, mask: Tensor | None, dead_B: Tensor | None) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = (p(x_BTD).view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        if dead_B is not None:  # rows whose keys are all padding output 0
            o = o.masked_fill(dead_B[:, None, None, None], 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(F.gelu(self.fc1(x))))


class Block(GradientCheckpointingLayer):
    """Post-LN: h = LN1(x + attn(x)); out = LN2(h + ffn(h)). Under gradient checkpointing its
    activations are recomputed in the backward pass (x is passed positionally for that)."""

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.attention = SelfAttention(dim, config.num_attention_heads, config.attention_dropout)
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, config.intermediate_size, config.activation_dropout)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: Tensor, mask: Tensor | None, dead_B: Tensor | None) -> Tensor:
        h = self.attention_norm(x + self.dropout(self.attention(x, mask, dead_B)))
        return self.ffn_norm(h + self.dropout(self.ffn(h)))


class Encoder(nn.Module):
    """Positions (audio: conv over the padded-to-zero input, added; image: sin-cos table), CLS,
    input LayerNorm, prenet and main blocks; ALiBi and padding enter as one additive mask."""

    def __init__(self, config: Data2Vec2Config, *, waveform: bool) -> None:
        """waveform: the audio encoder's parts (conv positions, ALiBi), else the image encoder's
        (sin-cos positions, CLS token); each model class says which it is."""
        super().__init__()
        c, dim = config, config.hidden_size
        audio = waveform
        self.pos_conv = ConvPositions(dim, c.conv_pos_depth, c.conv_pos_kernel, c.conv_pos_groups) if audio else None
        grid = c.image_size // c.patch_size
        self.sincos = SinCosPositions(grid, dim) if not audio and c.sincos_positions else None
        self.alibi = AlibiScale(c.num_attention_heads) if audio and c.alibi else None
        self.cls_token = ClsToken(dim) if not audio and c.cls_token else None
        self.layer_norm = nn.LayerNorm(dim, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)
        self.prenet = nn.ModuleList(Block(c) for _ in range(c.num_prenet_layers))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))

    def _mask(self, x: Tensor, padding_BT: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        B, T = x.shape[:2]
        mask = self.alibi(T) if self.alibi is not None else None
        dead = None
        if padding_BT is not None:
            dead = padding_BT.all(-1)
            live = padding_BT & ~dead[:, None]
            pad = torch.zeros((B, 1, 1, T), dtype=x.dtype, device=x.device)
            pad = pad.masked_fill(live[:, None, None, :], float("-inf"))
            mask = pad if mask is None else mask + pad
        return (None if mask is None else mask.to(x.dtype)), dead

    def forward(self, x: Tensor, padding_BT: Tensor | None, output_hidden_states: bool = False
                ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        if self.pos_conv is not None:
            x = x + self.pos_conv(x, padding_BT)
        if self.sincos is not None:
            x = self.sincos(x)
        if self.cls_token is not None:
            x = self.cls_token(x)
            if padding_BT is not None:
                padding_BT = torch.cat([padding_BT.new_zeros(x.shape[0], 1), padding_BT], dim=1)
        x = self.dropout(self.layer_norm(x))
        mask, dead = self._mask(x, padding_BT)
        states = [x] if output_hidden_states else None
        for block in [*self.prenet, *self.blocks]:
            x = block(x, mask, dead)
            if states is not None:
                states.append(x)
        return x, (tuple(states) if states is not None else None)


class Data2Vec2PreTrainedModel(PreTrainedModel):
    config_class = Data2Vec2Config
    base_model_prefix = "data2vec2"
    _no_split_modules = ["Block"]
    # Attention is torch's scaled_dot_product_attention whichever implementation is asked for:
    # "sdpa" and "eager" name the same computation here.
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    @staticmethod
    def _check_outputs(output_attentions: bool | None) -> None:
        if output_attentions:
            raise ValueError("output_attentions=True: this model computes attention with scaled_dot_product_attention, "
                             "which returns no attention weights")

    def _init_weights(self, module: nn.Module) -> None:
        """A fresh model (no pretrained weights): BERT-style normal linear layers, unit LayerNorms,
        the fixed tables recomputed."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, AlibiScale):
            module.scale.data.fill_(1.0)
            module.slopes.copy_(alibi_slopes(module.slopes.numel()))
        elif isinstance(module, SinCosPositions):
            grid = self.config.image_size // self.config.patch_size
            module.table.copy_(sincos_table(grid, self.config.hidden_size))
        elif isinstance(module, ClsToken):
            module.weight.data.normal_(0.0, 1.0)


class Data2Vec2AudioModel(Data2Vec2PreTrainedModel):
    """Waveform -> B×T×D frame features (`last_hidden_state`); `attention_mask` marks real samples."""

    main_input_name = "input_values"

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__(config)
        self.frontend = AudioFrontend(config.conv_layers, config.hidden_size)
        self.encoder = Encoder(config, waveform=True)
        self.post_init()

    def _get_feat_extract_output_lengths(self, input_lengths: Tensor) -> Tensor:
        """Frames per row from samples per row (the name transformers' audio models give it)."""
        return torch.tensor([self.frontend.num_frames(int(n)) for n in input_lengths.tolist()],
                            dtype=torch.long, device=input_lengths.device)

    def frame_padding(self, attention_mask: Tensor | None, num_samples: int, num_frames: int) -> Tensor | None:
        """B×T bool, True at frames made only of padding (None when no row is padded)."""
        if attention_mask is None:
            return None
        lengths = attention_mask.long().sum(-1)
        if not bool((lengths < num_samples).any()):
            return None
        frames = self._get_feat_extract_output_lengths(lengths)
        return torch.arange(num_frames, device=lengths.device)[None, :] >= frames[:, None]

    def forward(self, input_values: Tensor, attention_mask: Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool | None = None,
                return_dict: bool = True) -> BaseModelOutput:
        self._check_outputs(output_attentions)
        x = self.frontend(input_values)
        padding = self.frame_padding(attention_mask, input_values.shape[1], x.shape[1])
        h, states = self.encoder(x, padding, output_hidden_states)
        if not return_dict:
            return (h, states) if states is not None else (h,)
        return BaseModelOutput(last_hidden_state=h, hidden_states=states)


class Data2Vec2VisionModel(Data2Vec2PreTrainedModel):
    """Images -> B×(1+N)×D (`last_hidden_state`, the CLS token first)."""

    main_input_name = "pixel_values"

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__(config)
        self.frontend = PatchFrontend(config.patch_size, config.num_channels, config.hidden_size)
        self.encoder = Encoder(config, waveform=False)
        self.post_init()

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False, output_attentions: bool | None = None,
                return_dict: bool = True) -> BaseModelOutput:
        self._check_outputs(output_attentions)
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"images are {tuple(pixel_values.shape[-2:])}, the model expects {size}x{size}")
        h, states = self.encoder(self.frontend(pixel_values), None, output_hidden_states)
        if not return_dict:
            return (h, states) if states is not None else (h,)
        return BaseModelOutput(last_hidden_state=h, hidden_states=states)


# -- preprocessing -----------------------------------------------------------------------------

class Data2Vec2FeatureExtractor(Wav2Vec2FeatureExtractor):
    """Wav2Vec2's feature extractor with d2v's normalisation: each utterance (its real samples) to
    zero mean and unit variance with variance epsilon 1e-5, in float32."""

    @staticmethod
    def zero_mean_unit_var_norm(input_values: list[np.ndarray], attention_mask: list[np.ndarray] | None,
                                padding_value: float = 0.0) -> list[np.ndarray]:
        lengths = ([len(x) for x in input_values] if attention_mask is None
                   else np.array(attention_mask, np.int32).sum(-1).tolist())
        out = []
        for x, n in zip(input_values, lengths):
            wav = np.asarray(x[:n], dtype=np.float32)
            y = np.full(len(x), padding_value, dtype=np.float32)
            y[:n] = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)
            out.append(y)
        return out


class Data2Vec2ImageProcessor(BaseImageProcessor):
    """d2v's evaluation transform: RGB, bicubic resize to size×size (PIL), /255, per-channel mean/std.

    Takes what transformers' image processors take: PIL images, numpy arrays and torch tensors,
    channels last or first, integer (0-255) or float (0-1, rounded to the nearest of 256 levels),
    one image (H×W or 3-D), a batch (4-D) or a list of them."""

    model_input_names = ["pixel_values"]

    def __init__(self, size: int = 224, image_mean: list | None = None, image_std: list | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.image_mean = list(image_mean or [0.485, 0.456, 0.406])
        self.image_std = list(image_std or [0.229, 0.224, 0.225])

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    @staticmethod
    def _as_pil(image):
        """One image as a PIL image in uint8, the precision d2v's decoder hands to PIL's resize."""
        from PIL import Image

        if isinstance(image, Image.Image):
            return image
        array = to_numpy_array(image)
        if array.ndim == 2:  # greyscale, no channel axis
            array = array[..., None]
        array = to_channel_dimension_format(array, ChannelDimension.LAST, infer_channel_dimension_format(array))
        if np.issubdtype(array.dtype, np.floating):
            if not (np.all(array >= 0) and np.all(array <= 1)):
                raise ValueError(f"float image with values in [{array.min()}, {array.max()}]: float pixels are read "
                                 f"as 0-1 (give uint8 0-255 otherwise)")
            array = np.round(array * 255.0)
        elif not (np.all(array >= 0) and np.all(array <= 255)):
            raise ValueError(f"{array.dtype} image with values in [{array.min()}, {array.max()}]: pixels are 0-255")
        array = array.astype(np.uint8)
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)

    def preprocess(self, images, return_tensors: str | None = "pt") -> BatchFeature:
        from PIL import Image

        single = is_valid_image(images) and not isinstance(images, Image.Image) and images.ndim == 2
        try:
            images = [images] if single else make_flat_list_of_images(images)
        except ValueError:
            raise ValueError(f"cannot read {type(images).__name__} as images: give a PIL image, a numpy array or "
                             f"torch tensor (H×W, H×W×C, C×H×W, or a batch N×...), or a list of them") from None
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        out = []
        for image in images:
            image = self._as_pil(image).convert("RGB").resize((self.size, self.size), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
            out.append((x - mean) / std)
        return BatchFeature({"pixel_values": torch.stack(out)}, tensor_type=return_tensors)


# -- pipelines ---------------------------------------------------------------------------------

def read_audio(source, what: str) -> tuple[np.ndarray, int]:
    """(float32 mono waveform, sampling rate) of an audio file (path or bytes); several channels are
    averaged, as d2v's loader does. soundfile reads any format it knows; without it, the standard
    library reads PCM WAV."""
    import io

    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        import soundfile
    except ImportError:
        soundfile = None
    try:
        if soundfile is not None:
            wav, rate = soundfile.read(data, dtype="float32", always_2d=True)
        else:
            wav, rate = _read_pcm_wav(data)
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        hint = "" if soundfile is not None else " (without the soundfile package only PCM WAV files are read)"
        raise ValueError(f"cannot read {what} as audio: {err}{hint}") from None
    return (wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]).astype(np.float32), int(rate)


def _read_pcm_wav(data) -> tuple[np.ndarray, int]:
    import wave

    with wave.open(data, "rb") as f:
        width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
        raw = f.readframes(f.getnframes())
    if width not in (1, 2, 4):
        raise ValueError(f"{8 * width}-bit PCM is not read without soundfile")
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    return x.reshape(-1, channels), rate


class Data2Vec2AudioFeaturePipeline(Pipeline):
    """`pipeline("feature-extraction", OUT, trust_remote_code=True)` on audio: a file (path or
    bytes), a 1-D waveform (numpy, list or tensor; `sampling_rate=` if it is not the model's) or
    {"raw" or "array": waveform, "sampling_rate": rate}. Returns each clip's T×D frame features,
    its padded frames removed when clips are batched (batch_size > 1). Audio at another rate than
    the model's is refused: resample it first."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = True
    _load_tokenizer = False

    def _sanitize_parameters(self, sampling_rate: int | None = None, return_tensors: bool | None = None):
        pre = {} if sampling_rate is None else {"sampling_rate": sampling_rate}
        return pre, {}, ({} if return_tensors is None else {"return_tensors": return_tensors})

    def _waveform(self, inputs, sampling_rate: int | None) -> tuple[np.ndarray, int | None]:
        if isinstance(inputs, (str, bytes, bytearray)):
            what = inputs if isinstance(inputs, str) else "the given bytes"
            return read_audio(inputs, what)
        if isinstance(inputs, dict):
            keys = set(inputs)
            if not keys <= {"raw", "array", "sampling_rate"} or len(keys & {"raw", "array"}) != 1:
                raise ValueError(f"an audio dict holds 'raw' (or 'array') and 'sampling_rate'; got keys {sorted(keys)}")
            return self._waveform(inputs.get("raw", inputs.get("array")), inputs.get("sampling_rate", sampling_rate))
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.detach().cpu().float().numpy()
        wav = np.asarray(inputs, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"audio of shape {wav.shape}: give one channel as a 1-D waveform (average the channels)")
        return wav, sampling_rate

    def preprocess(self, inputs, sampling_rate: int | None = None):
        fe = self.feature_extractor
        wav, rate = self._waveform(inputs, sampling_rate)
        if rate is not None and rate != fe.sampling_rate:
            raise ValueError(f"audio at {rate} Hz: the model was trained at {fe.sampling_rate} Hz; resample it first")
        return fe(wav, sampling_rate=fe.sampling_rate, return_tensors="pt", return_attention_mask=True)

    def _forward(self, model_inputs):
        values = model_inputs["input_values"].to(self.dtype)  # fp16 / bf16 models take their own dtype
        mask = model_inputs.get("attention_mask")
        h = self.model(input_values=values, attention_mask=mask).last_hidden_state
        frames = (torch.full((h.shape[0],), h.shape[1], dtype=torch.long) if mask is None
                  else self.model._get_feat_extract_output_lengths(mask.long().sum(-1)))
        return {"last_hidden_state": h, "frames": frames.to(h.device)}

    def postprocess(self, model_outputs, return_tensors=False):
        # batched clips share the longest one's length: keep each clip's own frames
        h = model_outputs["last_hidden_state"][:, : int(model_outputs["frames"].reshape(-1)[0])]
        return h if return_tensors else h.tolist()


class Data2Vec2ImageFeaturePipeline(ImageFeatureExtractionPipeline):
    """`pipeline("feature-extraction", OUT, trust_remote_code=True)` on an image (PIL or path)."""
