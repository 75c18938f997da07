"""How d2v's data2vec 2.0 encoders map onto transformers (docs/method.md §8).

* Text: transformers' own Data2VecTextModel computes the 2.0 text encoder (RoBERTa embeddings,
  post-LN blocks, no final norm); the prenet blocks come first in its `encoder.layer` list.
* 1.0 audio keeps transformers' model but ships the modelling file for d2v's normalisation.
* Audio (ALiBi with learned per-head scales, a multi-layer positional conv) and image (post-LN
  blocks over patches with sin-cos positions and a CLS token): no transformers class computes
  them, so the export ships d2v's modelling file (hf_data2vec2.py, as modeling_data2vec2.py) and
  names its classes in config.json's `auto_map`. Its weight names are d2v's; the fixed tensors
  d2v keeps as non-persistent buffers (ALiBi slopes, sin-cos table) are written with the weights.
Standard library only, like hf_layout: exporting needs no transformers.
"""
from __future__ import annotations

import os
import re
from typing import Any

MODELING_FILE = "modeling_data2vec2.py"
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_data2vec2.py")
MODEL_TYPE = "data2vec2"
MODULE = MODELING_FILE[:-3]

# modality -> (model class, preprocessing class, its Auto class, pipeline class, pipeline input type)
CUSTOM = {
    "audio": ("Data2Vec2AudioModel", "Data2Vec2FeatureExtractor", "AutoFeatureExtractor",
              "Data2Vec2AudioFeaturePipeline", "audio"),
    "image": ("Data2Vec2VisionModel", "Data2Vec2ImageProcessor", "AutoImageProcessor",
              "Data2Vec2ImageFeaturePipeline", "image"),
}
FIXED_BUFFERS = ("encoder.alibi.slopes", "encoder.sincos.table")
"""Buffers the modelling file loads with the weights; d2v recomputes them (not in its state dicts)."""
PREDICTION_MODULES = ("head", "decoder")
"""Student modules that only predict targets in pretraining: never part of an exported encoder."""


def is_custom(cfg: Any) -> bool:
    """Whether this config exports to d2v's modelling file (2.0 audio and image)."""
    return cfg.model.drops_masked and cfg.model.modality in CUSTOM


def ships_code(cfg: Any) -> bool:
    """Whether the export carries the modelling file: for its model, or (1.0 audio, whose model is
    transformers' own) for d2v's normalisation, which Wav2Vec2FeatureExtractor does not compute
    (its variance epsilon is 1e-7, d2v's and fairseq's 1e-5: for quiet speech the difference is
    of the order of the signal)."""
    return is_custom(cfg) or cfg.model.modality == "audio"


def processing_entries(modality: str) -> dict[str, Any]:
    """config.json entries naming the modelling file's preprocessing and pipeline."""
    _, pre_cls, pre_auto, pipe_cls, kind = CUSTOM[modality]
    return {"auto_map": {pre_auto: f"{MODULE}.{pre_cls}"},
            "custom_pipelines": {"feature-extraction": {"impl": f"{MODULE}.{pipe_cls}", "pt": ["AutoModel"],
                                                        "type": kind}}}


def custom_config(cfg: Any) -> dict[str, Any]:
    """config.json of a 2.0 audio or image export: every field explicit, the classes in auto_map."""
    m, v = cfg.model, cfg.model.v2
    model_cls = CUSTOM[m.modality][0]
    entries = processing_entries(m.modality)
    out: dict[str, Any] = {
        "architectures": [model_cls], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{MODULE}.Data2Vec2Config", "AutoModel": f"{MODULE}.{model_cls}",
                     **entries["auto_map"]},
        "custom_pipelines": entries["custom_pipelines"],
        "modality": m.modality, "hidden_size": m.embed_dim, "num_hidden_layers": m.depth,
        "num_prenet_layers": v.prenet_depth, "num_attention_heads": m.num_heads, "intermediate_size": m.ffn_dim,
        "layer_norm_eps": m.norm_eps, "hidden_dropout": m.dropout, "attention_dropout": m.attention_dropout,
        "activation_dropout": m.activation_dropout, "initializer_range": m.init_std, "dtype": "float32"}
    if m.modality == "audio":
        a = m.audio
        out.update({"conv_layers": [list(c) for c in a.conv_layers], "conv_pos_depth": a.conv_pos_depth,
                    "conv_pos_kernel": a.conv_pos_kernel, "conv_pos_groups": a.conv_pos_groups,
                    "alibi": bool(v.alibi)})
    else:
        im = m.image
        out.update({"image_size": im.image_size, "patch_size": im.patch_size, "num_channels": im.in_chans,
                    "sincos_positions": bool(v.sincos_positions), "cls_token": bool(v.cls_token)})
    return out


def custom_preprocessing(cfg: Any) -> tuple[str, dict[str, Any]]:
    """preprocessor_config.json: the modelling file's processors, set as d2v's data pipeline is
    (every audio export, 2.0 image)."""
    m = cfg.model
    _, pre_cls, pre_auto, _, _ = CUSTOM[m.modality]
    common = {"auto_map": {pre_auto: f"{MODULE}.{pre_cls}"}}
    if m.modality == "audio":
        return "preprocessor_config.json", {
            **common, "feature_extractor_type": pre_cls, "feature_size": 1, "sampling_rate": m.audio.sample_rate,
            "padding_value": 0.0, "padding_side": "right", "do_normalize": bool(cfg.data.normalize),
            "return_attention_mask": True}
    im = m.image
    return "preprocessor_config.json", {**common, "image_processor_type": pre_cls, "size": im.image_size,
                                        "image_mean": list(im.mean), "image_std": list(im.std)}


def fixed_buffers(cfg: Any) -> dict[str, Any]:
    """The fixed tensors the modelling file reads from the weights, from d2v's own definitions."""
    from d2v.kernels import alibi_slopes
    from d2v.models.positions import sincos_2d

    m, v = cfg.model, cfg.model.v2
    if m.modality == "audio":
        return {"encoder.alibi.slopes": alibi_slopes(m.num_heads)} if v.alibi else {}
    grid = m.image.image_size // m.image.patch_size
    return {"encoder.sincos.table": sincos_2d((grid, grid), m.embed_dim)} if v.sincos_positions else {}


_BLOCK = re.compile(r"^encoder\.(prenet|blocks)\.(\d+)\.(.*)$")
_STOCK_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.(.*)$")


def to_stock_depth(name: str, prenet_depth: int) -> str:
    """A 2.0 student name with the prenet folded into one block list (what the stock text class
    holds): prenet i -> block i, block i -> block prenet_depth + i."""
    hit = _BLOCK.match(name)
    if hit is None:
        return name
    kind, index, rest = hit.groups()
    return f"encoder.blocks.{int(index) + (prenet_depth if kind == 'blocks' else 0)}.{rest}"


def from_stock_depth(name: str, prenet_depth: int) -> str:
    """The inverse of to_stock_depth."""
    hit = _STOCK_BLOCK.match(name)
    if hit is None or prenet_depth == 0:
        return name
    index, rest = int(hit.group(1)), hit.group(2)
    return f"encoder.prenet.{index}.{rest}" if index < prenet_depth else f"encoder.blocks.{index - prenet_depth}.{rest}"
