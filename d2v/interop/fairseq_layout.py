"""Parameter names of the reference checkpoints -> d2v's (data2vec 1.0).

* audio: fairseq `data2vec_audio` (wav2vec 2.0 names; `extractor_mode: layer_norm`);
* text: fairseq `data2vec_text` (RoBERTa names under `encoder.sentence_encoder.`);
* vision: the BEiT-based `data2vec_vision` code (fused qkv with separate q/v biases, gamma_1/2).

`map_state` renames a state dict and returns the keys it could not place; `KNOWN_UNUSED` are keys
that are safe to leave behind (buffers that d2v recomputes).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

_BLOCK_POST_LN = [  # fairseq TransformerSentenceEncoderLayer / TransformerEncoderLayer
    ("self_attn.q_proj", "attention.q_proj"), ("self_attn.k_proj", "attention.k_proj"),
    ("self_attn.v_proj", "attention.v_proj"), ("self_attn.out_proj", "attention.out_proj"),
    ("self_attn_layer_norm", "attention_norm"), ("fc1", "ffn.fc1"), ("fc2", "ffn.fc2"),
    ("final_layer_norm", "ffn_norm"),
]


def _blocks(src_prefix: str) -> list[tuple[str, str]]:
    return [(f"{src_prefix}#.{a}.{p}", f"encoder.blocks.#.{b}.{p}") for a, b in _BLOCK_POST_LN for p in ("weight", "bias")]


AUDIO = [
    ("feature_extractor.conv_layers.#.0.weight", "frontend.conv_layers.#.conv.weight"),
    ("feature_extractor.conv_layers.#.2.1.weight", "frontend.conv_layers.#.layer_norm.weight"),
    ("feature_extractor.conv_layers.#.2.1.bias", "frontend.conv_layers.#.layer_norm.bias"),
    ("layer_norm.weight", "frontend.layer_norm.weight"), ("layer_norm.bias", "frontend.layer_norm.bias"),
    ("post_extract_proj.weight", "frontend.projection.weight"), ("post_extract_proj.bias", "frontend.projection.bias"),
    ("mask_emb", "mask_embedding.weight"),
    ("encoder.pos_conv.#.0.weight", "encoder.pos_conv.layers.#.conv.weight"),
    ("encoder.pos_conv.#.0.bias", "encoder.pos_conv.layers.#.conv.bias"),
    ("encoder.layer_norm.weight", "encoder.layer_norm.weight"), ("encoder.layer_norm.bias", "encoder.layer_norm.bias"),
    ("final_proj.weight", "head.weight"), ("final_proj.bias", "head.bias"),
] + _blocks("encoder.layers.")

_SE = "encoder.sentence_encoder."
TEXT = [
    (_SE + "embed_tokens.weight", "frontend.word_embeddings.weight"),
    (_SE + "embed_positions.weight", "frontend.position_embeddings.weight"),
    (_SE + "layernorm_embedding.weight", "frontend.LayerNorm.weight"),
    (_SE + "layernorm_embedding.bias", "frontend.LayerNorm.bias"),
] + _blocks(_SE + "layers.") + [
    (f"encoder.regression_head.{i}.{p}", f"head.{i}.{p}") for i in (0, 2) for p in ("weight", "bias")
]

VISION = [
    ("cls_token", "encoder.cls_token.weight"), ("mask_token", "mask_embedding.weight"),
    ("patch_embed.proj.weight", "frontend.projection.weight"), ("patch_embed.proj.bias", "frontend.projection.bias"),
    ("rel_pos_bias.relative_position_bias_table", "encoder.rel_pos_bias.table"),
    ("norm.weight", "encoder.final_norm.weight"), ("norm.bias", "encoder.final_norm.bias"),
    ("lm_head.weight", "head.weight"), ("lm_head.bias", "head.bias"),
    ("blocks.#.gamma_1", "encoder.blocks.#.layer_scale_1.weight"),
    ("blocks.#.gamma_2", "encoder.blocks.#.layer_scale_2.weight"),
    ("blocks.#.attn.q_bias", "encoder.blocks.#.attention.q_proj.bias"),
    ("blocks.#.attn.v_bias", "encoder.blocks.#.attention.v_proj.bias"),
] + [
    (f"blocks.#.{a}.{p}", f"encoder.blocks.#.{b}.{p}")
    for a, b in [("norm1", "attention_norm"), ("norm2", "ffn_norm"), ("attn.proj", "attention.out_proj"),
                 ("mlp.fc1", "ffn.fc1"), ("mlp.fc2", "ffn.fc2")]
    for p in ("weight", "bias")
]

LAYOUTS = {"audio": AUDIO, "text": TEXT, "image": VISION}
KNOWN_UNUSED = re.compile(r"(^|\.)(version|relative_position_index|_float_tensor)$")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.weight$")


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace("\\#", r"(\d+)").replace("#", r"(\d+)") + "$")


_COMPILED = {k: [(_compile(a), b) for a, b in v] for k, v in LAYOUTS.items()}



def apply_rules(rules, key: str) -> str | None:
    """The d2v name of a fairseq key: the first (pattern, target) whose pattern matches, with each
    `#` of the target replaced by the next captured group; None when no rule matches."""
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            for g in m.groups():
                target = target.replace("#", g, 1)
            return target
    return None

def map_state(modality: str, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """(d2v-named state, keys left behind as known-unused, keys that could not be mapped)."""
    out: dict[str, Tensor] = {}
    unused, unmapped = [], []
    for key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            unmapped.append(key)
            continue
        if modality == "image" and _QKV.match(key):
            i = _QKV.match(key).group(1)
            q, k, v = tensor.chunk(3, dim=0)  # rows [q; k; v] of the fused projection
            for name, part in (("q", q), ("k", k), ("v", v)):
                out[f"encoder.blocks.{i}.attention.{name}_proj.weight"] = part.clone()
            continue
        name = apply_rules(_COMPILED[modality], key)
        if name is not None:
            out[name] = tensor
        else:
            (unused if KNOWN_UNUSED.search(key) else unmapped).append(key)
    if "encoder.cls_token.weight" in out:
        out["encoder.cls_token.weight"] = out["encoder.cls_token.weight"].reshape(1, 1, -1)
    if "mask_embedding.weight" in out:
        out["mask_embedding.weight"] = out["mask_embedding.weight"].reshape(-1)
    return out, unused, unmapped


def strip_prefix(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Drops a wrapper prefix (a fine-tuned model's `w2v_encoder.w2v_model.`, timm EMA's `module.`)
    when every key carries it."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def to_float(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.float().contiguous() if torch.is_floating_point(v) else v for k, v in state.items()}


# -- data2vec 2.0 (`data2vec_multi`): one modality encoder + shared AltBlocks -------------------
_ALT_BLOCK = [("norm1", "attention_norm"), ("norm2", "ffn_norm"), ("attn.proj", "attention.out_proj"),
              ("mlp.fc1", "ffn.fc1"), ("mlp.fc2", "ffn.fc2")]
_V2_LOCAL = {
    "audio": [("local_encoder.conv_layers.#.0.weight", "frontend.conv_layers.#.conv.weight"),
              ("local_encoder.conv_layers.#.2.1.weight", "frontend.conv_layers.#.layer_norm.weight"),
              ("local_encoder.conv_layers.#.2.1.bias", "frontend.conv_layers.#.layer_norm.bias"),
              ("project_features.1.weight", "frontend.layer_norm.weight"),
              ("project_features.1.bias", "frontend.layer_norm.bias"),
              ("project_features.2.weight", "frontend.projection.weight"),
              ("project_features.2.bias", "frontend.projection.bias"),
              ("alibi_scale", "encoder.alibi.scale")],
    "image": [("local_encoder.proj.weight", "frontend.projection.weight"),
              ("local_encoder.proj.bias", "frontend.projection.bias"),
              ("extra_tokens", "encoder.cls_token.weight")],
    "text": [("local_encoder.embed_tokens.weight", "frontend.word_embeddings.weight"),
             ("local_encoder.embed_positions.weight", "frontend.position_embeddings.weight"),
             ("local_encoder.layernorm_embedding.weight", "frontend.LayerNorm.weight"),
             ("local_encoder.layernorm_embedding.bias", "frontend.LayerNorm.bias")],
}
V2_MODALITIES = {"AUDIO": "audio", "IMAGE": "image", "TEXT": "text"}
# fairseq's fixed sin-cos table: d2v recomputes it.
V2_KNOWN_UNUSED = re.compile(r"fixed_positional_encoder\.positions$")
_POS_CONV = re.compile(r"^relative_positional_encoder\.(\d+)\.0\.(weight|bias)$")
_FUSED = re.compile(r"^(context_encoder\.)?blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def _v2_rules(modality: str) -> list[tuple[re.Pattern, str]]:
    pairs = list(_V2_LOCAL[modality])
    for src, dst in (("context_encoder.blocks.#.", "encoder.prenet.#."), ("blocks.#.", "encoder.blocks.#.")):
        pairs += [(f"{src}{a}.{p}", f"{dst}{b}.{p}") for a, b in _ALT_BLOCK for p in ("weight", "bias")]
    pairs += [("context_encoder.norm.weight", "encoder.layer_norm.weight"),
              ("context_encoder.norm.bias", "encoder.layer_norm.bias"),
              ("decoder.blocks.#.0.weight", "decoder.layers.#.conv.weight"),
              ("decoder.blocks.#.0.bias", "decoder.layers.#.conv.bias"),
              ("decoder.proj.weight", "decoder.proj.weight"), ("decoder.proj.bias", "decoder.proj.bias"),
              ("decoder.proj.#.weight", "decoder.proj.#.weight"), ("decoder.proj.#.bias", "decoder.proj.#.bias")]
    return [(_compile(a), b) for a, b in pairs]


def map_v2_state(state: dict[str, Tensor], encoder_name: str | None = None
                 ) -> tuple[str, dict[str, Tensor], list[str], list[str]]:
    """(modality, d2v-named state, known-unused keys, unmapped keys) of a data2vec_multi state dict.
    encoder_name (AUDIO, IMAGE, TEXT) is found from the keys unless given (an EMA of the blocks
    only has no modality-encoder keys)."""
    names = [encoder_name] if encoder_name else sorted({k.split(".")[1] for k in state
                                                       if k.startswith("modality_encoders.")})
    if len(names) != 1 or names[0] not in V2_MODALITIES:
        raise ValueError(f"a data2vec 2.0 checkpoint with modality encoders {names}: d2v imports exactly one of "
                         f"{sorted(V2_MODALITIES)}")
    modality = V2_MODALITIES[names[0]]
    prefix = f"modality_encoders.{names[0]}."
    rules = _v2_rules(modality)
    out: dict[str, Tensor] = {}
    unused, unmapped = [], []
    for key, tensor in state.items():
        local = key[len(prefix):] if key.startswith(prefix) else key
        if not isinstance(tensor, Tensor):
            unmapped.append(key)
            continue
        fused = _FUSED.match(local)
        pos = _POS_CONV.match(local) if modality == "audio" else None
        if fused:
            where = "prenet" if fused.group(1) else "blocks"
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):  # rows [q; k; v]
                out[f"encoder.{where}.{fused.group(2)}.attention.{name}_proj.{fused.group(3)}"] = part.clone()
            continue
        if pos:  # entry 0 of fairseq's Sequential is a transpose: conv layer i sits at i + 1
            out[f"encoder.pos_conv.layers.{int(pos.group(1)) - 1}.conv.{pos.group(2)}"] = tensor
            continue
        name = apply_rules(rules, local)
        if name is not None:
            out[name] = tensor
        else:
            (unused if V2_KNOWN_UNUSED.search(local) or KNOWN_UNUSED.search(local) else unmapped).append(key)
    if "encoder.cls_token.weight" in out:
        t = out["encoder.cls_token.weight"]
        if t.shape[1] != 1:
            unmapped.append(f"{prefix}extra_tokens ({t.shape[1]} extra tokens; d2v has one CLS token)")
    return modality, out, unused, unmapped
