"""The one factory that assembles a Data2Vec student (1.0 or 2.0) from a ModelConfig.

Initialisation follows each reference model (docs/method.md, section "Initialisation"): fairseq's
`init_bert_params` for the audio and text Transformers, PyTorch's defaults where fairseq leaves them
(audio projection, audio head, positional convs), BEiT's truncated normal for vision 1.0.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from d2v.config.schema import D2vConfig, ModelConfig
from d2v.models.audio import AudioFeatureEncoder, ConvPositionalEncoder
from d2v.models.text import TextEmbedding
from d2v.models.vision import PatchEmbed, RelativePositionBias
from d2v.models.blocks import TransformerBlock
from d2v.models.data2vec import Data2Vec
from d2v.models.decoders import ConvDecoder
from d2v.models.encoder import Encoder
from d2v.models.positions import AlibiScale, SinCosPositions
from d2v.models.init import bert_init, exempt_from_weight_decay, trunc_init


# model.head -> the regression head (the names are CHOICES["model.head"])
HEADS: dict[str, Callable[[int], nn.Module]] = {
    "linear": lambda d: nn.Linear(d, d),
    "mlp": lambda d: nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)),
}


def build_head(m: ModelConfig) -> nn.Module:
    return HEADS[m.head](m.embed_dim)


def build_blocks(m: ModelConfig, count: int | None = None, *, drop_path: float = 0.0, layer_scale_init: float = 0.0,
                 qkv_bias: tuple[bool, bool, bool] = (True, True, True)) -> list[nn.Module]:
    """`count` blocks (default: m.depth); `drop_path` rises linearly from 0 at the first block to
    the given rate at the last."""
    n = m.depth if count is None else count
    rates = [drop_path * i / max(n - 1, 1) for i in range(n)]
    return [
        TransformerBlock(m.embed_dim, m.num_heads, m.ffn_dim, layer_norm_first=m.layer_norm_first, eps=m.norm_eps,
                         dropout=m.dropout, attention_dropout=m.attention_dropout,
                         activation_dropout=m.activation_dropout, drop_path=rates[i],
                         layer_scale_init=layer_scale_init, qkv_bias=qkv_bias)
        for i in range(n)
    ]


def build_audio(m: ModelConfig) -> Data2Vec:
    a = m.audio
    encoder = Encoder(
        build_blocks(m),
        pos_conv=ConvPositionalEncoder(m.embed_dim, a.conv_pos_depth, a.conv_pos_kernel, a.conv_pos_groups),
        layer_norm=nn.LayerNorm(m.embed_dim, eps=m.norm_eps),
        dropout=m.dropout, layerdrop=m.layerdrop)
    bert_init(encoder, m.init_std)
    # fairseq's data2vec_audio applies init_bert_params to the encoder only: the projection
    # (post_extract_proj) and the head (final_proj) keep PyTorch's default, the convs Kaiming.
    head = build_head(m)
    frontend = AudioFeatureEncoder(a.conv_layers, m.embed_dim)
    return Data2Vec(frontend, encoder, head, embed_dim=m.embed_dim, feature_dropout=m.feature_dropout)


def build_image(m: ModelConfig) -> Data2Vec:
    """BEiT-style pre-LN ViT: q and v biases, no k bias, layer scale, drop path, shared relative
    position bias, CLS token, final LayerNorm (transformers' Data2VecVisionModel, pretraining flags)."""
    im = m.image
    patch = PatchEmbed(im.image_size, im.patch_size, im.in_chans, m.embed_dim)
    blocks = build_blocks(m, drop_path=im.drop_path, layer_scale_init=im.layer_scale_init, qkv_bias=(True, False, True))
    encoder = Encoder(
        blocks, final_norm=nn.LayerNorm(m.embed_dim, eps=m.norm_eps), dropout=m.dropout, layerdrop=m.layerdrop,
        cls_token=True, rel_pos_bias=RelativePositionBias(patch.grid, m.num_heads) if im.rel_pos_bias else None)
    for module in (encoder, patch):
        trunc_init(module, m.init_std)
    head = build_head(m)
    trunc_init(head, m.init_std)
    model = Data2Vec(patch, encoder, head, embed_dim=m.embed_dim, feature_dropout=m.feature_dropout)
    std = m.init_std
    nn.init.trunc_normal_(model.mask_embedding.weight, std=std, a=-std, b=std)
    nn.init.trunc_normal_(encoder.cls_token.weight, std=std, a=-std, b=std)
    if encoder.rel_pos_bias is not None:
        nn.init.zeros_(encoder.rel_pos_bias.table)  # BEiT starts the relative position table at zero
    # BEiT's no_weight_decay(): pos_embed (d2v has none) and cls_token; 1-D parameters (the mask
    # embedding among them) are exempt through optim.no_decay_1d.
    exempt_from_weight_decay(encoder.cls_token.weight)
    return model


def build_text(m: ModelConfig) -> Data2Vec:
    """RoBERTa layout: embeddings + LayerNorm, then post-LN blocks; the embedding dropout is the
    model's feature dropout, so the encoder adds none of its own."""
    t = m.text
    embed = TextEmbedding(t.vocab_size, t.max_positions, t.pad_id, m.embed_dim, m.norm_eps)
    encoder = Encoder(build_blocks(m), dropout=0.0, layerdrop=m.layerdrop)
    head = build_head(m)
    for module in (embed, encoder, head):
        bert_init(module, m.init_std)
    with torch.no_grad():
        embed.word_embeddings.weight[t.pad_id].zero_()
        embed.position_embeddings.weight[t.pad_id].zero_()
    return Data2Vec(embed, encoder, head, embed_dim=m.embed_dim, feature_dropout=m.feature_dropout,
                    mask_embedding=False)


# data2vec 2.0 (docs/method.md §3.3): post-LN blocks (validate refuses layer_norm_first), the encoder over
# kept tokens, conv decoders.

def _decoder(m: ModelConfig, grid: tuple[int, int] | None = None) -> ConvDecoder:
    v = m.v2
    return ConvDecoder(m.embed_dim, v.decoder_dim, v.decoder_kernel, v.decoder_layers, v.decoder_groups,
                       residual=v.decoder_residual, projection_layers=v.decoder_projection_layers, grid=grid)


def _assemble_v2(m: ModelConfig, frontend: nn.Module, encoder: Encoder, decoder: ConvDecoder) -> Data2Vec:
    v = m.v2
    return Data2Vec(frontend, encoder, decoder=decoder, embed_dim=m.embed_dim, num_masks=v.num_masks,
                    feature_dropout=m.feature_dropout, decoder_input_dropout=v.decoder_input_dropout,
                    mask_noise_std=v.mask_noise_std)


def build_audio_v2(m: ModelConfig) -> Data2Vec:
    a, v = m.audio, m.v2
    prenet = build_blocks(m, v.prenet_depth)  # built before the main blocks: the init draws in this order
    encoder = Encoder(
        build_blocks(m), prenet=prenet,
        pos_conv=ConvPositionalEncoder(m.embed_dim, a.conv_pos_depth, a.conv_pos_kernel, a.conv_pos_groups),
        alibi=AlibiScale(m.num_heads, v.alibi_scale_init) if v.alibi else None,
        layer_norm=nn.LayerNorm(m.embed_dim, eps=m.norm_eps), dropout=m.dropout, layerdrop=m.layerdrop)
    bert_init(encoder, m.init_std)  # linear layers; the positional conv keeps PyTorch's default
    # The audio encoder's reset_parameters() gives the projection PyTorch's default back
    # (fairseq `examples/data2vec/models/modalities/audio.py`).
    frontend = AudioFeatureEncoder(a.conv_layers, m.embed_dim)
    return _assemble_v2(m, frontend, encoder, _decoder(m))


def build_image_v2(m: ModelConfig) -> Data2Vec:
    im, v = m.image, m.v2
    patch = PatchEmbed(im.image_size, im.patch_size, im.in_chans, m.embed_dim)
    prenet = build_blocks(m, v.prenet_depth)  # built before the main blocks: the init draws in this order
    encoder = Encoder(
        build_blocks(m), prenet=prenet,
        sincos=SinCosPositions(patch.grid, m.embed_dim) if v.sincos_positions else None,
        cls_token=v.cls_token, layer_norm=nn.LayerNorm(m.embed_dim, eps=m.norm_eps),
        dropout=m.dropout, layerdrop=m.layerdrop)
    # fairseq `data2vec2.py` / `modalities/images.py`: init_bert_params on the linear layers, Xavier-uniform
    # patch projection (as a D×(C·p·p) matrix, bias left at PyTorch's default), CLS token N(0, 1).
    bert_init(encoder, m.init_std)
    w = patch.projection.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if encoder.cls_token is not None:
        nn.init.normal_(encoder.cls_token.weight, std=1.0)
    return _assemble_v2(m, patch, encoder, _decoder(m, patch.grid))


def build_text_v2(m: ModelConfig) -> Data2Vec:
    """RoBERTa embeddings (+ LayerNorm; dropout is the model's feature dropout), then post-LN blocks."""
    t, v = m.text, m.v2
    embed = TextEmbedding(t.vocab_size, t.max_positions, t.pad_id, m.embed_dim, m.norm_eps)
    prenet = build_blocks(m, v.prenet_depth)
    encoder = Encoder(build_blocks(m), prenet=prenet, dropout=0.0, layerdrop=m.layerdrop)
    for module in (embed, encoder):
        bert_init(module, m.init_std)
    with torch.no_grad():
        embed.word_embeddings.weight[t.pad_id].zero_()
        embed.position_embeddings.weight[t.pad_id].zero_()
    return _assemble_v2(m, embed, encoder, _decoder(m))


BUILDERS = {"audio": build_audio, "image": build_image, "text": build_text}
BUILDERS_V2 = {"audio": build_audio_v2, "image": build_image_v2, "text": build_text_v2}


def build_model(cfg: D2vConfig | ModelConfig) -> Data2Vec:
    """The student for a config (or its model section): one that fills the masked positions (1.0),
    or one that drops them (2.0: model.v2.enabled)."""
    m = cfg.model if isinstance(cfg, D2vConfig) else cfg
    builders = BUILDERS_V2 if m.drops_masked else BUILDERS
    try:
        builder = builders[m.modality]
    except KeyError:
        raise ValueError(f"no model for modality {m.modality!r}; available: {sorted(BUILDERS)}") from None
    return builder(m)
