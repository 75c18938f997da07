"""Parameter names of the reference checkpoints -> d2v's, and the settings the weights imply.

* audio: fairseq `data2vec_audio` (wav2vec 2.0 names; `extractor_mode: layer_norm`);
* text: fairseq `data2vec_text` (RoBERTa names under `encoder.sentence_encoder.`);
* vision: the BEiT-based `data2vec_vision` code (fused qkv with separate q/v biases, gamma_1/2);
* data2vec 2.0 (`data2vec_multi`): one modality encoder + shared AltBlocks.

Everything that differs between modalities (how a checkpoint shows which it is, its names, keys
whose tensor becomes several, where the EMA teacher is kept, the settings its weights fix) is one
FairseqLayout in FAIRSEQ_LAYOUTS. `map_state` / `map_v2_state` rename a state dict and return the
keys they could not place; `KNOWN_UNUSED` are keys that are safe to leave behind (buffers that d2v
recomputes).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from d2v.interop.fairseq_method import UNSET, audio_v1_method, beit_method, lookup, text_v1_method


class ImportRefused(ValueError):
    """A checkpoint d2v will not import; the message names what does not fit."""


_BLOCK_POST_LN = [  # fairseq TransformerSentenceEncoderLayer / TransformerEncoderLayer
    ("self_attn.q_proj", "attention.q_proj"), ("self_attn.k_proj", "attention.k_proj"),
    ("self_attn.v_proj", "attention.v_proj"), ("self_attn.out_proj", "attention.out_proj"),
    ("self_attn_layer_norm", "attention_norm"), ("fc1", "ffn.fc1"), ("fc2", "ffn.fc2"),
    ("final_layer_norm", "ffn_norm"),
]


def _blocks(src_prefix: str) -> list[tuple[str, str]]:
    return [(f"{src_prefix}#.{a}.{p}", f"encoder.blocks.#.{b}.{p}") for a, b in _BLOCK_POST_LN for p in ("weight", "bias")]


_AUDIO = [
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
_TEXT = [
    (_SE + "embed_tokens.weight", "frontend.word_embeddings.weight"),
    (_SE + "embed_positions.weight", "frontend.position_embeddings.weight"),
    (_SE + "layernorm_embedding.weight", "frontend.LayerNorm.weight"),
    (_SE + "layernorm_embedding.bias", "frontend.LayerNorm.bias"),
] + _blocks(_SE + "layers.") + [
    (f"encoder.regression_head.{i}.{p}", f"head.{i}.{p}") for i in (0, 2) for p in ("weight", "bias")
]

_VISION = [
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

KNOWN_UNUSED = re.compile(r"(^|\.)(version|relative_position_index|_float_tensor)$")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.weight$")


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace("\\#", r"(\d+)").replace("#", r"(\d+)") + "$")


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


# -- reading the reference cfg and the weights' sizes ------------------------------------------
def setting(section: Any, *paths: str) -> Any:
    """The value at the first of `paths` (dotted, from `section`) that is set. Never searched for
    elsewhere in the tree: a saved data2vec_multi cfg holds every modality's defaults, and the
    first match would be another modality's."""
    for path in paths:
        node = lookup(section, path)
        if node is not UNSET and node is not None:
            return node
    return None


def modality_section(model_cfg: dict[str, Any], encoder: str) -> dict[str, Any]:
    """model.modalities.<audio|image|text> of a data2vec_multi cfg: the settings that modality owns."""
    section = setting(model_cfg, f"modalities.{encoder.lower()}")
    return section if isinstance(section, dict) else {}


def conv_spec(expr: str) -> Any:
    """Evaluates fairseq's conv spec strings ("[(512, 10, 5)] + [(512, 3, 2)] * 4") without eval."""
    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ImportRefused(f"cannot read the conv spec {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def attention_heads(model_cfg: dict[str, Any], what: str) -> int:
    heads = setting(model_cfg, "encoder_attention_heads", "transformer.encoder.attention_heads", "num_heads")
    if heads is None:
        raise ImportRefused(f"the checkpoint's cfg does not give the number of attention heads of the {what} "
                            f"model (encoder_attention_heads); d2v cannot infer it from the weights")
    return int(heads)


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
_AUDIO_V2 = [("local_encoder.conv_layers.#.0.weight", "frontend.conv_layers.#.conv.weight"),
             ("local_encoder.conv_layers.#.2.1.weight", "frontend.conv_layers.#.layer_norm.weight"),
             ("local_encoder.conv_layers.#.2.1.bias", "frontend.conv_layers.#.layer_norm.bias"),
             ("project_features.1.weight", "frontend.layer_norm.weight"),
             ("project_features.1.bias", "frontend.layer_norm.bias"),
             ("project_features.2.weight", "frontend.projection.weight"),
             ("project_features.2.bias", "frontend.projection.bias"),
             ("alibi_scale", "encoder.alibi.scale")]
_IMAGE_V2 = [("local_encoder.proj.weight", "frontend.projection.weight"),
             ("local_encoder.proj.bias", "frontend.projection.bias"),
             ("extra_tokens", "encoder.cls_token.weight")]
_TEXT_V2 = [("local_encoder.embed_tokens.weight", "frontend.word_embeddings.weight"),
            ("local_encoder.embed_positions.weight", "frontend.position_embeddings.weight"),
            ("local_encoder.layernorm_embedding.weight", "frontend.LayerNorm.weight"),
            ("local_encoder.layernorm_embedding.bias", "frontend.LayerNorm.bias")]
# fairseq's fixed sin-cos table: d2v recomputes it.
V2_KNOWN_UNUSED = re.compile(r"fixed_positional_encoder\.positions$")
_POS_CONV = re.compile(r"^relative_positional_encoder\.(\d+)\.0\.(weight|bias)$")
_FUSED = re.compile(r"^(context_encoder\.)?blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


# -- what differs between modalities ---------------------------------------------------------
def _no_split(key: str, tensor: Tensor) -> None:
    return None


def _split_qkv(key: str, tensor: Tensor) -> dict[str, Tensor] | None:
    """BEiT's fused q/k/v projection weight -> d2v's three."""
    m = _QKV.match(key)
    if m is None:
        return None
    q, k, v = tensor.chunk(3, dim=0)  # rows [q; k; v] of the fused projection
    return {f"encoder.blocks.{m.group(1)}.attention.{name}_proj.weight": part.clone()
            for name, part in (("q", q), ("k", k), ("v", v))}


def _split_pos_conv(key: str, tensor: Tensor) -> dict[str, Tensor] | None:
    """data2vec_multi's audio positional convs, renumbered."""
    pos = _POS_CONV.match(key)
    if pos is None:
        return None
    # entry 0 of fairseq's Sequential is a transpose: conv layer i sits at i + 1
    return {f"encoder.pos_conv.layers.{int(pos.group(1)) - 1}.conv.{pos.group(2)}": tensor}


def _fairseq_ema(ckpt: dict[str, Any], state: dict[str, Tensor], module: str,
                 whole: tuple[str, ...]) -> dict[str, Tensor] | None:
    """fairseq's EMA teacher (popped from the model state) under the student's names. fairseq
    averages a sub-module (`module`): its keys are relative to it unless the whole model was
    averaged (keys starting with `whole`)."""
    ema = state.pop("_ema", None)
    if ema is None:
        ema = state.pop("encoder._ema", None)
    if ema is None:
        ema = ckpt.get("_ema")
    if ema is None:
        return None
    ema = dict(ema)
    ema.pop("__sq_mom", None)
    ema = strip_prefix(ema, ("module.",))
    if not any(k.startswith(whole) for k in ema):
        ema = {module + k: v for k, v in ema.items()}
    return ema


def _audio_ema(ckpt: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    return _fairseq_ema(ckpt, state, "encoder.", ("encoder.", "feature_extractor."))


def _text_ema(ckpt: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    return _fairseq_ema(ckpt, state, "encoder.sentence_encoder.", ("encoder.",))


def _beit_ema(ckpt: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    ema_state = ckpt.get("model_ema")
    return strip_prefix(dict(ema_state), ("module.",)) if isinstance(ema_state, dict) else None


def _pos_conv_sizes(m: Any, student: dict[str, Tensor]) -> None:
    pos = student["encoder.pos_conv.layers.0.conv.weight"]
    m.audio.conv_pos_depth = count_blocks(student, "encoder.pos_conv.layers.")
    m.audio.conv_pos_kernel, m.audio.conv_pos_groups = pos.shape[2], m.embed_dim // pos.shape[1]


def _audio_config(m: Any, student: dict[str, Tensor], model_cfg: dict[str, Any], vocab_size: int | None) -> None:
    if setting(model_cfg, "layer_norm_first"):
        raise ImportRefused("the checkpoint has layer_norm_first=true (pre-LN); d2v's audio model is post-LN")
    spec = setting(model_cfg, "conv_feature_layers")
    convs = conv_spec(spec) if isinstance(spec, str) else [tuple(c) for c in m.audio.conv_layers]
    n_conv = count_blocks(student, "frontend.conv_layers.")
    if len(convs) != n_conv:
        raise ImportRefused(f"cfg conv_feature_layers has {len(convs)} layers, the weights {n_conv}")
    for i, (c, k, _) in enumerate(convs):
        w = student[f"frontend.conv_layers.{i}.conv.weight"]
        if (w.shape[0], w.shape[2]) != (c, k):
            raise ImportRefused(f"conv layer {i}: cfg says {c} channels, kernel {k}; the weights are {tuple(w.shape)}")
    m.audio.conv_layers = tuple(tuple(int(v) for v in c) for c in convs)
    _pos_conv_sizes(m, student)
    m.num_heads = attention_heads(model_cfg, m.modality)


def _text_config(m: Any, student: dict[str, Tensor], model_cfg: dict[str, Any], vocab_size: int | None) -> None:
    m.num_heads = attention_heads(model_cfg, m.modality)
    m.text.vocab_size = vocab_size if vocab_size is not None else student["frontend.word_embeddings.weight"].shape[0]
    m.text.max_positions = student["frontend.position_embeddings.weight"].shape[0] - m.text.pad_id - 1
    if "head.0.weight" not in student:
        raise ImportRefused("the checkpoint's regression head is not the 2-layer head d2v's text model uses")


def _image_config(m: Any, student: dict[str, Tensor], model_cfg: dict[str, Any], vocab_size: int | None) -> None:
    proj = student["frontend.projection.weight"]
    table = student["encoder.rel_pos_bias.table"] if "encoder.rel_pos_bias.table" in student else None
    if table is None:
        raise ImportRefused("the vision checkpoint has no shared relative position bias "
                            "(rel_pos_bias.relative_position_bias_table); d2v pretrains with one")
    m.num_heads = table.shape[1]
    grid = round(((table.shape[0] - 3) ** 0.5 + 1) / 2)
    m.image.patch_size, m.image.in_chans = proj.shape[2], proj.shape[1]
    m.image.image_size = grid * proj.shape[2]
    if "encoder.blocks.0.layer_scale_1.weight" not in student:
        m.image.layer_scale_init = 0.0


def _audio_config_v2(m: Any, student: dict[str, Tensor], model_cfg: dict[str, Any], *,
                     vocab_size: int | None, num_patches: int | None) -> None:
    spec = setting(modality_section(model_cfg, "audio"), "feature_encoder_spec")
    convs = conv_spec(spec) if isinstance(spec, str) else [tuple(c) for c in m.audio.conv_layers]
    m.audio.conv_layers = tuple(tuple(int(x) for x in c) for c in convs)
    _pos_conv_sizes(m, student)


def _image_config_v2(m: Any, student: dict[str, Tensor], model_cfg: dict[str, Any], *,
                     vocab_size: int | None, num_patches: int | None) -> None:
    proj = student["frontend.projection.weight"]
    m.image.patch_size, m.image.in_chans = proj.shape[2], proj.shape[1]
    size = setting(modality_section(model_cfg, "image"), "input_size")
    if size is not None:
        m.image.image_size = int(size)
    elif num_patches is not None:  # the sin-cos table has one row per patch
        m.image.image_size = round(num_patches ** 0.5) * m.image.patch_size
    m.v2.cls_token = "encoder.cls_token.weight" in student


def _text_config_v2(m: Any, student: dict[str, Tensor], model_cfg: dict[str, Any], *,
                    vocab_size: int | None, num_patches: int | None) -> None:
    m.text.vocab_size = vocab_size
    m.text.max_positions = student["frontend.position_embeddings.weight"].shape[0] - m.text.pad_id - 1


@dataclass(frozen=True)
class FairseqLayout:
    """One modality's reference checkpoints, 1.0 and 2.0. A new modality adds one FAIRSEQ_LAYOUTS
    entry; nothing else tests the modality."""

    name: str
    detects: Callable[[dict[str, Tensor]], bool]
    """Whether a 1.0 model state dict is this modality's (tried in FAIRSEQ_LAYOUTS order)."""
    rules: tuple[tuple[str, str], ...]
    """1.0 (reference name, d2v name); '#' stands for a block/layer index."""
    ema: Callable[[dict[str, Any], dict[str, Tensor]], dict[str, Tensor] | None]
    """ema(checkpoint, model state) -> the 1.0 EMA teacher under the student's reference names, if stored."""
    config: Callable[..., None]
    """config(model_cfg, student, reference cfg, vocab_size): sets the 1.0 settings the weights fix."""
    v2_encoder: str
    """data2vec_multi's name of the modality encoder (`modality_encoders.AUDIO.`)."""
    v2_rules: tuple[tuple[str, str], ...]
    """2.0 (name inside the modality encoder, d2v name)."""
    config_v2: Callable[..., None]
    """config_v2(model_cfg, student, reference cfg, *, vocab_size, num_patches): the 2.0 settings."""
    split: Callable[[str, Tensor], dict[str, Tensor] | None] = _no_split
    """1.0 keys whose tensor becomes several d2v ones: their d2v-named parts, else None."""
    split_v2: Callable[[str, Tensor], dict[str, Tensor] | None] = _no_split
    """The same for 2.0 keys (relative to the modality encoder), besides the fused qkv all share."""
    dict_rows: bool = False
    """Whether the word embedding's rows follow fairseq's dict.txt (moved to the tokenizer's ids on import)."""
    method: Callable[[Any, dict[str, Any]], list[str]] | None = None
    """method(d2v config, saved settings tree) -> notes: the 1.0 training settings (fairseq_method)."""
    settings_root: str | None = "model"
    """Where the 1.0 model's own settings sit in the saved tree (None: the tree itself)."""


def _is_audio(state: dict[str, Tensor]) -> bool:
    return any(k.startswith("feature_extractor.conv_layers.") for k in state)


def _is_text(state: dict[str, Tensor]) -> bool:
    return any(k.startswith("encoder.sentence_encoder.") for k in state)


def _is_beit(state: dict[str, Tensor]) -> bool:
    return "patch_embed.proj.weight" in state and any(k.endswith("attn.qkv.weight") for k in state)


# In detection order (`detects`).
FAIRSEQ_LAYOUTS = {layout.name: layout for layout in (
    FairseqLayout("audio", detects=_is_audio, rules=tuple(_AUDIO), ema=_audio_ema, config=_audio_config,
                  v2_encoder="AUDIO", v2_rules=tuple(_AUDIO_V2), config_v2=_audio_config_v2,
                  split_v2=_split_pos_conv, method=audio_v1_method),
    FairseqLayout("text", detects=_is_text, rules=tuple(_TEXT), ema=_text_ema, config=_text_config,
                  v2_encoder="TEXT", v2_rules=tuple(_TEXT_V2), config_v2=_text_config_v2, dict_rows=True,
                  method=text_v1_method),
    FairseqLayout("image", detects=_is_beit, rules=tuple(_VISION), ema=_beit_ema, config=_image_config,
                  v2_encoder="IMAGE", v2_rules=tuple(_IMAGE_V2), config_v2=_image_config_v2, split=_split_qkv,
                  # data2vec_vision saves its argparse namespace, where `model` names the timm model
                  method=beit_method, settings_root=None),
)}
V2_MODALITIES = {layout.v2_encoder: name for name, layout in FAIRSEQ_LAYOUTS.items()}
_COMPILED = {name: [(_compile(a), b) for a, b in layout.rules] for name, layout in FAIRSEQ_LAYOUTS.items()}


def fairseq_layout(modality: str) -> FairseqLayout:
    try:
        return FAIRSEQ_LAYOUTS[modality]
    except KeyError:
        raise ImportRefused(f"d2v has no reference checkpoint layout for modality {modality!r}; it reads "
                            f"{sorted(FAIRSEQ_LAYOUTS)}") from None


def map_state(modality: str, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """(d2v-named state, keys left behind as known-unused, keys that could not be mapped)."""
    layout = fairseq_layout(modality)
    out: dict[str, Tensor] = {}
    unused, unmapped = [], []
    for key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            unmapped.append(key)
            continue
        parts = layout.split(key, tensor)
        if parts is not None:
            out.update(parts)
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


def _v2_rules(layout: FairseqLayout) -> list[tuple[re.Pattern, str]]:
    pairs = list(layout.v2_rules)
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
    layout = FAIRSEQ_LAYOUTS[modality]
    prefix = f"modality_encoders.{names[0]}."
    rules = _v2_rules(layout)
    out: dict[str, Tensor] = {}
    unused, unmapped = [], []
    for key, tensor in state.items():
        local = key[len(prefix):] if key.startswith(prefix) else key
        if not isinstance(tensor, Tensor):
            unmapped.append(key)
            continue
        fused = _FUSED.match(local)
        if fused:
            where = "prenet" if fused.group(1) else "blocks"
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):  # rows [q; k; v]
                out[f"encoder.{where}.{fused.group(2)}.attention.{name}_proj.{fused.group(3)}"] = part.clone()
            continue
        parts = layout.split_v2(local, tensor)
        if parts is not None:
            out.update(parts)
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
