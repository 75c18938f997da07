"""The one factory that assembles a Data2Vec student from a ModelConfig (STYLE.md 4)."""
from __future__ import annotations

from torch import nn

from d2v.config.schema import D2vConfig, ModelConfig
from d2v.models.audio import AudioFeatureEncoder, ConvPositionalEncoder
from d2v.models.blocks import TransformerBlock
from d2v.models.data2vec import Data2Vec
from d2v.models.encoder import TransformerEncoder


def build_head(m: ModelConfig) -> nn.Module:
    if m.head == "linear":
        return nn.Linear(m.embed_dim, m.embed_dim)
    if m.head == "mlp":
        return nn.Sequential(nn.Linear(m.embed_dim, 2 * m.embed_dim), nn.GELU(), nn.Linear(2 * m.embed_dim, m.embed_dim))
    raise ValueError(f"unknown head {m.head!r}")


def build_blocks(m: ModelConfig) -> list[nn.Module]:
    return [
        TransformerBlock(m.embed_dim, m.num_heads, m.ffn_dim, layer_norm_first=m.layer_norm_first, eps=m.norm_eps,
                         dropout=m.dropout, attention_dropout=m.attention_dropout,
                         activation_dropout=m.activation_dropout)
        for _ in range(m.depth)
    ]


def _bert_init(module: nn.Module, std: float) -> None:
    """Normal(0, std) linear/embedding weights, zero biases (fairseq's init_bert_params)."""
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, std=std)


def build_audio(m: ModelConfig) -> Data2Vec:
    a = m.audio
    encoder = TransformerEncoder(
        build_blocks(m),
        pos_conv=ConvPositionalEncoder(m.embed_dim, a.conv_pos_depth, a.conv_pos_kernel, a.conv_pos_groups),
        layer_norm=nn.LayerNorm(m.embed_dim, eps=m.norm_eps),
        dropout=m.dropout, layerdrop=m.layerdrop)
    _bert_init(encoder, m.init_std)
    head = build_head(m)
    _bert_init(head, m.init_std)
    frontend = AudioFeatureEncoder(a.conv_layers, m.embed_dim)
    _bert_init(frontend, m.init_std)  # the projection; convs keep their Kaiming init
    return Data2Vec(frontend, encoder, head, embed_dim=m.embed_dim, feature_dropout=m.feature_dropout)


BUILDERS = {"audio": build_audio}


def build_model(cfg: D2vConfig | ModelConfig) -> Data2Vec:
    """The student for a config (or its model section)."""
    m = cfg.model if isinstance(cfg, D2vConfig) else cfg
    try:
        builder = BUILDERS[m.modality]
    except KeyError:
        raise ValueError(f"no model for modality {m.modality!r}; available: {sorted(BUILDERS)}") from None
    return builder(m)
