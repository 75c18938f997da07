"""How d2v's 1.0 models (and 2.0 text) map onto transformers' Data2Vec{Audio,Vision,Text}Model
(docs/method.md §8; 2.0 audio and image: hf_v2.py).

Weights: a renaming (plus one reshape, the vision mask token), in both directions. Configs: the
transformers config with every structural field written explicitly (their defaults differ from
data2vec's: eps, position flags, layer scale, vocabulary, positions...), and the reverse map
from a transformers config to d2v `model.*` fields, so a directory can be checked against a run.
Standard library only: exporting needs no transformers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

# (d2v name, transformers name); '#' stands for a block/layer index.
_AUDIO = [
    ("frontend.conv_layers.#.conv.weight", "feature_extractor.conv_layers.#.conv.weight"),
    ("frontend.conv_layers.#.layer_norm.weight", "feature_extractor.conv_layers.#.layer_norm.weight"),
    ("frontend.conv_layers.#.layer_norm.bias", "feature_extractor.conv_layers.#.layer_norm.bias"),
    ("frontend.layer_norm.weight", "feature_projection.layer_norm.weight"),
    ("frontend.layer_norm.bias", "feature_projection.layer_norm.bias"),
    ("frontend.projection.weight", "feature_projection.projection.weight"),
    ("frontend.projection.bias", "feature_projection.projection.bias"),
    ("mask_embedding.weight", "masked_spec_embed"),
    ("encoder.pos_conv.layers.#.conv.weight", "encoder.pos_conv_embed.layers.#.conv.weight"),
    ("encoder.pos_conv.layers.#.conv.bias", "encoder.pos_conv_embed.layers.#.conv.bias"),
    ("encoder.layer_norm.weight", "encoder.layer_norm.weight"),
    ("encoder.layer_norm.bias", "encoder.layer_norm.bias"),
] + [
    (f"encoder.blocks.#.{a}.{p}", f"encoder.layers.#.{b}.{p}")
    for a, b in [("attention.q_proj", "attention.q_proj"), ("attention.k_proj", "attention.k_proj"),
                 ("attention.v_proj", "attention.v_proj"), ("attention.out_proj", "attention.out_proj"),
                 ("attention_norm", "layer_norm"), ("ffn.fc1", "feed_forward.intermediate_dense"),
                 ("ffn.fc2", "feed_forward.output_dense"), ("ffn_norm", "final_layer_norm")]
    for p in ("weight", "bias")
]

_IMAGE = [
    ("frontend.projection.weight", "embeddings.patch_embeddings.projection.weight"),
    ("frontend.projection.bias", "embeddings.patch_embeddings.projection.bias"),
    ("mask_embedding.weight", "embeddings.mask_token"),
    ("encoder.cls_token.weight", "embeddings.cls_token"),
    ("encoder.rel_pos_bias.table", "encoder.relative_position_bias.relative_position_bias_table"),
    ("encoder.final_norm.weight", "layernorm.weight"),
    ("encoder.final_norm.bias", "layernorm.bias"),
    ("encoder.blocks.#.layer_scale_1.weight", "encoder.layer.#.lambda_1"),
    ("encoder.blocks.#.layer_scale_2.weight", "encoder.layer.#.lambda_2"),
] + [
    (f"encoder.blocks.#.{a}.{p}", f"encoder.layer.#.{b}.{p}")
    for a, b in [("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                 ("attention.v_proj", "attention.attention.value"), ("attention.out_proj", "attention.output.dense"),
                 ("attention_norm", "layernorm_before"), ("ffn_norm", "layernorm_after"),
                 ("ffn.fc1", "intermediate.dense"), ("ffn.fc2", "output.dense")]
    for p in ("weight", "bias")
]

_TEXT = [
    (f"frontend.{n}", f"embeddings.{n}")
    for n in ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
              "LayerNorm.weight", "LayerNorm.bias")
] + [
    (f"encoder.blocks.#.{a}.{p}", f"encoder.layer.#.{b}.{p}")
    for a, b in [("attention.q_proj", "attention.self.query"), ("attention.k_proj", "attention.self.key"),
                 ("attention.v_proj", "attention.self.value"), ("attention.out_proj", "attention.output.dense"),
                 ("attention_norm", "attention.output.LayerNorm"), ("ffn.fc1", "intermediate.dense"),
                 ("ffn.fc2", "output.dense"), ("ffn_norm", "output.LayerNorm")]
    for p in ("weight", "bias")
]

# Parts of transformers checkpoints d2v has no use for: task heads and pooler, and buffers older
# versions saved. Loading lists them (never silently) and goes on.
HF_IGNORABLE = re.compile(r"^(pooler\.|lm_head\.|classifier\.|qa_outputs\.|projector\.|tdnn\.|feature_extractor_head\.)"
                          r"|(^|\.)(position_ids|token_type_ids|relative_position_index)$")


def _same(fields: dict[str, Any]) -> dict[str, Any]:
    return fields


def _no_preprocessing(cfg: Any) -> None:
    return None


@dataclass(frozen=True)
class HFLayout:
    """Everything d2v knows about one modality's transformers model, both directions. A new
    modality adds one HF_LAYOUTS entry; nothing else tests the modality."""

    modality: str
    architecture: str
    """transformers' model class (config.json `architectures`)."""
    model_type: str
    """config.json `model_type`."""
    prefix: str
    """Where transformers' task models keep this backbone ('data2vec_audio.')."""
    rules: tuple[tuple[str, str], ...]
    """(d2v name, transformers name) of every weight; '#' stands for a block/layer index."""
    config: Callable[[Any, dict[str, Any]], dict[str, Any]]
    """config(model_cfg, common fields) -> config.json; raises for what transformers cannot express."""
    fields_from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    """fields_from_hf(config.json) -> the modality's `model.*` fields; raises for what d2v cannot build."""
    structural: Callable[[Any], dict[str, Any]]
    """structural(model_cfg) -> the modality's `model.*` fields that decide the architecture."""
    comparable: Callable[[dict[str, Any]], dict[str, Any]] = _same
    """fields_from_hf's fields in the form `structural` gives them (to compare a directory with a run)."""
    preprocessing: Callable[[Any], tuple[str, dict[str, Any]] | None] = _no_preprocessing
    """preprocessing(cfg) -> (file name, JSON) of transformers' preprocessing settings, or None."""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """transformers names whose tensors are reshaped on export (-1: d2v's length)."""
    needs_tokenizer: bool = False
    """Whether an export ships the run's tokenizer."""


def _audio_config(m: Any, common: dict[str, Any]) -> dict[str, Any]:
    a = m.audio
    if m.layer_norm_first:
        raise ValueError("transformers' Data2VecAudioModel is post-LN only; model.layer_norm_first=true has no export")
    if m.norm_eps != 1e-5:
        # transformers uses layer_norm_eps for the 512-channel feature norm too, d2v fixes it at 1e-5.
        raise ValueError(f"model.norm_eps={m.norm_eps}: transformers' audio model would apply it to the "
                         f"feature LayerNorm, which d2v keeps at 1e-5; only 1e-5 exports exactly")
    return {**common,
            "conv_dim": [c for c, _, _ in a.conv_layers], "conv_kernel": [k for _, k, _ in a.conv_layers],
            "conv_stride": [s for _, _, s in a.conv_layers], "conv_bias": False,
            "feat_extract_activation": "gelu", "num_feat_extract_layers": len(a.conv_layers),
            "num_conv_pos_embeddings": a.conv_pos_depth, "conv_pos_kernel_size": a.conv_pos_kernel,
            "num_conv_pos_embedding_groups": a.conv_pos_groups,
            "hidden_dropout": m.dropout, "attention_dropout": m.attention_dropout,
            "activation_dropout": m.activation_dropout, "feat_proj_dropout": m.feature_dropout,
            "final_dropout": 0.1, "layerdrop": m.layerdrop,
            # > 0 so that transformers builds masked_spec_embed (d2v's mask embedding); these
            # are its SpecAugment settings for fine-tuning (training mode only).
            "mask_time_prob": 0.05, "mask_time_length": 10, "mask_time_min_masks": 2,
            "mask_feature_prob": 0.0, "mask_feature_length": 10, "mask_feature_min_masks": 0,
            "add_adapter": False, "use_weighted_layer_sum": False,
            "vocab_size": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _audio_fields(hf: dict[str, Any]) -> dict[str, Any]:
    convs = tuple(zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"]))
    if hf.get("conv_bias", False):
        raise ValueError("config.json has conv_bias=true; d2v's waveform convs have no bias")
    return {"model.layer_norm_first": False, "model.audio.conv_layers": tuple(tuple(c) for c in convs),
            "model.audio.conv_pos_depth": hf["num_conv_pos_embeddings"],
            "model.audio.conv_pos_kernel": hf["conv_pos_kernel_size"],
            "model.audio.conv_pos_groups": hf["num_conv_pos_embedding_groups"]}


def _audio_structural(m: Any) -> dict[str, Any]:
    return {"model.audio.conv_layers": tuple(tuple(c) for c in m.audio.conv_layers),
            "model.audio.conv_pos_depth": m.audio.conv_pos_depth,
            "model.audio.conv_pos_kernel": m.audio.conv_pos_kernel,
            "model.audio.conv_pos_groups": m.audio.conv_pos_groups}


def _image_config(m: Any, common: dict[str, Any]) -> dict[str, Any]:
    im = m.image
    if not m.layer_norm_first:
        raise ValueError("transformers' Data2VecVisionModel is pre-LN only; model.layer_norm_first=false has no export")
    return {**common,
            "image_size": im.image_size, "patch_size": im.patch_size, "num_channels": im.in_chans,
            "use_mask_token": True, "use_absolute_position_embeddings": False,
            "use_relative_position_bias": False, "use_shared_relative_position_bias": bool(im.rel_pos_bias),
            "layer_scale_init_value": im.layer_scale_init, "drop_path_rate": im.drop_path,
            "use_mean_pooling": False, "hidden_dropout_prob": m.dropout,
            "attention_probs_dropout_prob": m.attention_dropout}


def _image_fields(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_absolute_position_embeddings") or hf.get("use_relative_position_bias"):
        raise ValueError("config.json uses absolute position embeddings or per-layer relative position bias "
                         "(a fine-tuned layout); d2v pretrains with one relative position bias shared by all blocks")
    if hf.get("use_mean_pooling", True):
        raise ValueError("config.json has use_mean_pooling=true (no final LayerNorm, a fine-tuned layout); "
                         "d2v's vision encoder ends with a LayerNorm (use_mean_pooling=false)")
    return {"model.layer_norm_first": True, "model.image.image_size": hf["image_size"],
            "model.image.patch_size": hf["patch_size"], "model.image.in_chans": hf["num_channels"],
            "model.image.rel_pos_bias": bool(hf.get("use_shared_relative_position_bias", False)),
            "model.image.layer_scale_init": hf["layer_scale_init_value"]}


def _image_structural(m: Any) -> dict[str, Any]:
    return {"model.image.image_size": m.image.image_size, "model.image.patch_size": m.image.patch_size,
            "model.image.in_chans": m.image.in_chans, "model.image.rel_pos_bias": m.image.rel_pos_bias,
            # only whether layer-scale parameters exist; their initial value is overwritten
            "model.image.layer_scale_init": m.image.layer_scale_init > 0}


def _image_comparable(fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "model.image.layer_scale_init": fields["model.image.layer_scale_init"] > 0}


def _image_preprocessing(cfg: Any) -> tuple[str, dict[str, Any]]:
    im = cfg.model.image
    # d2v's evaluation transform: bicubic resize to image_size, /255, per-channel mean/std.
    return "preprocessor_config.json", {
        "image_processor_type": "BeitImageProcessor", "do_resize": True,
        "size": {"height": im.image_size, "width": im.image_size}, "resample": 3, "do_center_crop": False,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(im.mean), "image_std": list(im.std), "do_reduce_labels": False}


def _text_config(m: Any, common: dict[str, Any]) -> dict[str, Any]:
    t = m.text
    if m.layer_norm_first:
        raise ValueError("transformers' Data2VecTextModel is post-LN only; model.layer_norm_first=true has no export")
    return {**common,
            "vocab_size": t.vocab_size, "max_position_embeddings": t.max_positions + t.pad_id + 1,
            "type_vocab_size": 1, "pad_token_id": t.pad_id, "bos_token_id": t.bos_id, "eos_token_id": t.eos_id,
            "hidden_dropout_prob": m.dropout, "attention_probs_dropout_prob": m.attention_dropout,
            "is_decoder": False, "add_cross_attention": False, "use_cache": False, "tie_word_embeddings": True}


def _text_fields(hf: dict[str, Any]) -> dict[str, Any]:
    pad = hf.get("pad_token_id", 1)
    if hf.get("type_vocab_size", 2) != 1:
        raise ValueError(f"config.json has type_vocab_size={hf.get('type_vocab_size', 2)}; d2v's text embedding "
                         f"has one token type (RoBERTa)")
    return {"model.layer_norm_first": False, "model.text.vocab_size": hf["vocab_size"],
            "model.text.max_positions": hf["max_position_embeddings"] - pad - 1, "model.text.pad_id": pad,
            "model.text.bos_id": hf.get("bos_token_id", 0), "model.text.eos_id": hf.get("eos_token_id", 2)}


def _text_structural(m: Any) -> dict[str, Any]:
    t = m.text
    return {"model.text.vocab_size": t.vocab_size, "model.text.max_positions": t.max_positions,
            "model.text.pad_id": t.pad_id, "model.text.bos_id": t.bos_id, "model.text.eos_id": t.eos_id}


HF_LAYOUTS = {layout.modality: layout for layout in (
    HFLayout("audio", architecture="Data2VecAudioModel", model_type="data2vec-audio", prefix="data2vec_audio.",
             # preprocessing: d2v's feature extractor (hf_v2.py), not transformers'
             rules=tuple(_AUDIO), config=_audio_config, fields_from_hf=_audio_fields, structural=_audio_structural),
    HFLayout("image", architecture="Data2VecVisionModel", model_type="data2vec-vision", prefix="data2vec_vision.",
             rules=tuple(_IMAGE), config=_image_config, fields_from_hf=_image_fields, structural=_image_structural,
             comparable=_image_comparable, preprocessing=_image_preprocessing,
             # transformers' vision mask token is 1×1×D, d2v's mask embedding D.
             shapes={"embeddings.mask_token": (1, 1, -1)}),
    HFLayout("text", architecture="Data2VecTextModel", model_type="data2vec-text", prefix="data2vec_text.",
             rules=tuple(_TEXT), config=_text_config, fields_from_hf=_text_fields, structural=_text_structural,
             needs_tokenizer=True),
)}


def hf_layout(modality: str) -> HFLayout:
    try:
        return HF_LAYOUTS[modality]
    except KeyError:
        raise ValueError(f"no transformers model for modality {modality!r}") from None


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace("\\#", r"(\d+)").replace("#", r"(\d+)") + "$")


def _rename(name: str, pairs: tuple[tuple[str, str], ...], src: int) -> str | None:
    for pair in pairs:
        m = _compile(pair[src]).match(name)
        if m:
            out = pair[1 - src]
            for g in m.groups():
                out = out.replace("#", g, 1)
            return out
    return None


def d2v_to_hf_name(modality: str, name: str) -> str | None:
    """The transformers name of a d2v student parameter (None: not part of transformers' model, e.g. the head)."""
    return _rename(name, hf_layout(modality).rules, 0)


def hf_to_d2v_name(modality: str, name: str) -> str | None:
    return _rename(name, hf_layout(modality).rules, 1)


def is_v2(cfg: Any) -> bool:
    """True for a data2vec 2.0 config, whose student drops the masked positions."""
    return cfg.model.drops_masked


def stock_depth(cfg: Any) -> int:
    """Blocks in the stock transformers model: 2.0's prenet blocks run first, in the same list."""
    return cfg.model.depth + (cfg.model.v2.prenet_depth if is_v2(cfg) else 0)


def hf_config(cfg: Any) -> dict[str, Any]:
    """transformers config.json contents for a config whose encoder a stock transformers class
    computes (1.0, and 2.0 text), every structural field explicit."""
    from d2v.interop.hf_v2 import is_custom, stock_v2_entries

    m = cfg.model
    if is_custom(cfg):
        raise ValueError(f"preset {cfg.name!r} is data2vec 2.0 {m.modality}: no stock transformers class computes "
                         f"it (d2v/interop/hf_v2.py writes its own modelling file)")
    layout = hf_layout(m.modality)
    common = {"architectures": [layout.architecture], "model_type": layout.model_type,
              "hidden_size": m.embed_dim, "num_hidden_layers": stock_depth(cfg), "num_attention_heads": m.num_heads,
              "intermediate_size": m.ffn_dim, "hidden_act": "gelu", "initializer_range": m.init_std,
              "layer_norm_eps": m.norm_eps, "dtype": "float32", **stock_v2_entries(cfg)}
    return layout.config(m, common)


def layout_of_hf(hf: dict[str, Any]) -> HFLayout:
    """The layout of a transformers config.json (by its model_type)."""
    kind = hf.get("model_type")
    for layout in HF_LAYOUTS.values():
        if layout.model_type == kind:
            return layout
    raise ValueError(f"config.json has model_type {kind!r}; d2v reads "
                     f"{sorted(layout.model_type for layout in HF_LAYOUTS.values())}")


def model_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The d2v `model.*` settings (dotted keys) a transformers config fixes; raises on what d2v cannot build."""
    layout = layout_of_hf(hf)
    out = {"model.modality": layout.modality, "model.embed_dim": hf["hidden_size"],
           "model.depth": hf["num_hidden_layers"], "model.num_heads": hf["num_attention_heads"],
           "model.ffn_dim": hf["intermediate_size"], "model.norm_eps": hf["layer_norm_eps"]}
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"config.json has hidden_act={act!r}; d2v's blocks use exact GELU")
    out.update(layout.fields_from_hf(hf))
    return out
