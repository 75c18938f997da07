"""data2vec 2.0 encoders for transformers: the modelling file `export --format hf` copies into a
2.0 audio or image export as modeling_data2vec2.py (config.json's `auto_map` names its classes).

Self-contained on purpose: it imports only torch, numpy, PIL and transformers, never d2v, so
`AutoModel.from_pretrained(OUT, trust_remote_code=True)` works where d2v is not installed. It
repeats d2v's encoder (d2v/models) operation for operation, so that in fp32 eval mode it returns
what d2v's encoder returns bit for bit (tests/test_hf_v2.py checks it from outside the checkout).
Weight names are d2v's student names (frontend.*, encoder.*). The fixed tensors (ALiBi slopes,
sin-cos table) are stored with the weights; they are also computed here so that a model built
from its config alone has them.

Also here: the preprocessing d2v applied in pretraining (a feature extractor that normalises each
utterance as d2v's loader does, an image processor that resizes and normalises as d2v's
evaluation transform does) and `feature-extraction` pipelines for both.
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


class Block(nn.Module):
    """Post-LN: h = LN1(x + attn(x)); out = LN2(h + ffn(h))."""

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

    def frame_padding(self, attention_mask: Tensor | None, num_samples: int, num_frames: int) -> Tensor | None:
        """B×T bool, True at frames made only of padding (None when no row is padded)."""
        if attention_mask is None:
            return None
        lengths = attention_mask.long().sum(-1)
        if not bool((lengths < num_samples).any()):
            return None
        frames = torch.tensor([self.frontend.num_frames(int(n)) for n in lengths.tolist()], device=lengths.device)
        return torch.arange(num_frames, device=lengths.device)[None, :] >= frames[:, None]

    def forward(self, input_values: Tensor, attention_mask: Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True, **kwargs) -> BaseModelOutput:
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

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False, return_dict: bool = True,
                **kwargs) -> BaseModelOutput:
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
    """d2v's evaluation transform: RGB, bicubic resize to size×size (PIL), /255, per-channel mean/std."""

    model_input_names = ["pixel_values"]

    def __init__(self, size: int = 224, image_mean: list | None = None, image_std: list | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.image_mean = list(image_mean or [0.485, 0.456, 0.406])
        self.image_std = list(image_std or [0.229, 0.224, 0.225])

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        from PIL import Image

        if not isinstance(images, (list, tuple)):
            images = [images]
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        out = []
        for image in images:
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            image = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
            out.append((x - mean) / std)
        return BatchFeature({"pixel_values": torch.stack(out)}, tensor_type=return_tensors)


# -- pipelines ---------------------------------------------------------------------------------

class Data2Vec2AudioFeaturePipeline(Pipeline):
    """`pipeline("feature-extraction", OUT, trust_remote_code=True)` on a 1-D waveform at the
    model's sampling rate: its T×D frame features."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = True
    _load_tokenizer = False

    def _sanitize_parameters(self, return_tensors=None, **kwargs):
        return {}, {}, ({} if return_tensors is None else {"return_tensors": return_tensors})

    def preprocess(self, waveform):
        fe = self.feature_extractor
        return fe(np.asarray(waveform, dtype=np.float32), sampling_rate=fe.sampling_rate, return_tensors="pt",
                  return_attention_mask=True)

    def _forward(self, model_inputs):
        return self.model(**model_inputs)

    def postprocess(self, model_outputs, return_tensors=False):
        h = model_outputs.last_hidden_state
        return h if return_tensors else h.tolist()


class Data2Vec2ImageFeaturePipeline(ImageFeatureExtractionPipeline):
    """`pipeline("feature-extraction", OUT, trust_remote_code=True)` on an image (PIL or path)."""
