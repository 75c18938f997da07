"""Assembles the data2vec 2.0 student from a ModelConfig (docs/method.md §3.3), reusing the 1.0 parts:
feature encoders, post-LN blocks, the conv positional encoder."""
from __future__ import annotations

import torch
from torch import nn

from d2v.config.schema import ModelConfig
from d2v.models.audio import AudioFeatureEncoder, ConvPositionalEncoder
from d2v.models.blocks import TransformerBlock
from d2v.models.data2vec_v2 import Data2VecV2
from d2v.models.decoders import ConvDecoder
from d2v.models.encoder_v2 import AlibiScale, EncoderV2, SinCosPositions
from d2v.models.init import bert_init
from d2v.models.text import TextEmbedding
from d2v.models.vision import PatchEmbed


def _blocks(m: ModelConfig, n: int) -> list[nn.Module]:
    return [TransformerBlock(m.embed_dim, m.num_heads, m.ffn_dim, layer_norm_first=False, eps=m.norm_eps,
                             dropout=m.dropout, attention_dropout=m.attention_dropout,
                             activation_dropout=m.activation_dropout) for _ in range(n)]


def _decoder(m: ModelConfig, grid: tuple[int, int] | None = None) -> ConvDecoder:
    v = m.v2
    return ConvDecoder(m.embed_dim, v.decoder_dim, v.decoder_kernel, v.decoder_layers, v.decoder_groups,
                       residual=v.decoder_residual, projection_layers=v.decoder_projection_layers, grid=grid)


def _assemble(m: ModelConfig, frontend: nn.Module, encoder: EncoderV2, decoder: ConvDecoder) -> Data2VecV2:
    v = m.v2
    return Data2VecV2(frontend, encoder, decoder, embed_dim=m.embed_dim, num_masks=v.num_masks,
                      feature_dropout=m.feature_dropout, decoder_input_dropout=v.decoder_input_dropout,
                      mask_noise_std=v.mask_noise_std)


def build_audio_v2(m: ModelConfig) -> Data2VecV2:
    a, v = m.audio, m.v2
    encoder = EncoderV2(
        _blocks(m, v.prenet_depth), _blocks(m, m.depth),
        pos_conv=ConvPositionalEncoder(m.embed_dim, a.conv_pos_depth, a.conv_pos_kernel, a.conv_pos_groups),
        alibi=AlibiScale(m.num_heads, v.alibi_scale_init) if v.alibi else None,
        layer_norm=nn.LayerNorm(m.embed_dim, eps=m.norm_eps), dropout=m.dropout, layerdrop=m.layerdrop)
    bert_init(encoder, m.init_std)  # linear layers; the positional conv keeps PyTorch's default
    # The audio encoder's reset_parameters() gives the projection PyTorch's default back
    # (fairseq `examples/data2vec/models/modalities/audio.py`).
    frontend = AudioFeatureEncoder(a.conv_layers, m.embed_dim)
    return _assemble(m, frontend, encoder, _decoder(m))


def build_image_v2(m: ModelConfig) -> Data2VecV2:
    im, v = m.image, m.v2
    patch = PatchEmbed(im.image_size, im.patch_size, im.in_chans, m.embed_dim)
    encoder = EncoderV2(
        _blocks(m, v.prenet_depth), _blocks(m, m.depth),
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
    return _assemble(m, patch, encoder, _decoder(m, patch.grid))


def build_text_v2(m: ModelConfig) -> Data2VecV2:
    """RoBERTa embeddings (+ LayerNorm; dropout is the model's feature dropout), then post-LN blocks."""
    t, v = m.text, m.v2
    embed = TextEmbedding(t.vocab_size, t.max_positions, t.pad_id, m.embed_dim, m.norm_eps)
    encoder = EncoderV2(_blocks(m, v.prenet_depth), _blocks(m, m.depth), dropout=0.0, layerdrop=m.layerdrop)
    for module in (embed, encoder):
        bert_init(module, m.init_std)
    with torch.no_grad():
        embed.word_embeddings.weight[t.pad_id].zero_()
        embed.position_embeddings.weight[t.pad_id].zero_()
    return _assemble(m, embed, encoder, _decoder(m))


BUILDERS_V2 = {"audio": build_audio_v2, "image": build_image_v2, "text": build_text_v2}
