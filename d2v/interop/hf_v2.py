"""How d2v's data2vec 2.0 encoders map onto transformers (docs/method.md §8).

* Text: transformers' own Data2VecTextModel computes the 2.0 text encoder (RoBERTa embeddings,
  post-LN blocks, no final norm); the prenet blocks come first in its `encoder.layer` list, and
  config.json's STOCK_PRENET_KEY says how many (and that the model is 2.0).
* 1.0 audio keeps transformers' model but ships the modelling file for d2v's normalisation.
* Audio (ALiBi with learned per-head scales, a multi-layer positional conv) and image (post-LN
  blocks over patches with sin-cos positions and a CLS token): no transformers class computes
  them, so the export ships d2v's modelling file (hf_data2vec2.py, as modeling_data2vec2.py) and
  names its classes in config.json's `auto_map`. Its weight names are d2v's; the fixed tensors
  d2v keeps as non-persistent buffers (ALiBi slopes, sin-cos table) are written with the weights.
  config.json holds every structural field, so a copy transformers re-saved (no d2v_export.json)
  still rebuilds the d2v architecture (custom_model_fields).
Standard library only, like hf_layout: exporting needs no transformers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

MODELING_FILE = "modeling_data2vec2.py"
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_data2vec2.py")
MODEL_TYPE = "data2vec2"
MODULE = MODELING_FILE[:-3]

@dataclass(frozen=True)
class CustomExport:
    """What one modality's export through the modelling file names and writes."""

    model_cls: str
    pre_cls: str
    """The preprocessing class (feature extractor or image processor)."""
    pre_autos: tuple[str, ...]
    """The Auto classes that must return it (auto_map). AutoProcessor is named where transformers'
    own lookup would not find it: for a ...FeatureExtractor it tries ...ImageProcessor first."""
    pipe_cls: str
    pipeline_input: str
    """The pipeline's input type."""
    fields: tuple[tuple[str, str], ...]
    """(config.json key, d2v setting) of the modality's encoder parts: written from the config,
    read back when a directory has no d2v config (a copy transformers re-saved)."""
    preprocessing: Callable[[Any], dict[str, Any]]
    """preprocessor_config.json entries, set as d2v's data pipeline is."""
    buffers: Callable[[Any], dict[str, Any]]
    """Fixed tensors the modelling file reads from the weights, from d2v's own definitions."""
    processor_for_v1: bool = False
    """The 1.0 export (a transformers model) ships the preprocessing too."""


_COMMON_FIELDS = (("hidden_size", "model.embed_dim"), ("num_hidden_layers", "model.depth"),
                  ("num_prenet_layers", "model.v2.prenet_depth"), ("num_attention_heads", "model.num_heads"),
                  ("intermediate_size", "model.ffn_dim"), ("layer_norm_eps", "model.norm_eps"),
                  ("hidden_dropout", "model.dropout"), ("attention_dropout", "model.attention_dropout"),
                  ("activation_dropout", "model.activation_dropout"), ("initializer_range", "model.init_std"))
_AUDIO_FIELDS = (("conv_layers", "model.audio.conv_layers"), ("conv_pos_depth", "model.audio.conv_pos_depth"),
                 ("conv_pos_kernel", "model.audio.conv_pos_kernel"), ("conv_pos_groups", "model.audio.conv_pos_groups"),
                 ("alibi", "model.v2.alibi"))
_IMAGE_FIELDS = (("image_size", "model.image.image_size"), ("patch_size", "model.image.patch_size"),
                 ("num_channels", "model.image.in_chans"), ("sincos_positions", "model.v2.sincos_positions"),
                 ("cls_token", "model.v2.cls_token"))


def _audio_preprocessing(cfg: Any) -> dict[str, Any]:
    return {"feature_size": 1, "sampling_rate": cfg.model.audio.sample_rate, "padding_value": 0.0,
            "padding_side": "right", "do_normalize": bool(cfg.data.normalize), "return_attention_mask": True}


def _image_preprocessing(cfg: Any) -> dict[str, Any]:
    im = cfg.model.image
    return {"size": im.image_size, "image_mean": list(im.mean), "image_std": list(im.std)}


def _audio_buffers(cfg: Any) -> dict[str, Any]:
    from d2v.kernels import alibi_slopes

    return {"encoder.alibi.slopes": alibi_slopes(cfg.model.num_heads)} if cfg.model.v2.alibi else {}


def _image_buffers(cfg: Any) -> dict[str, Any]:
    from d2v.models.positions import sincos_2d

    m = cfg.model
    grid = m.image.image_size // m.image.patch_size
    return {"encoder.sincos.table": sincos_2d((grid, grid), m.embed_dim)} if m.v2.sincos_positions else {}


CUSTOM = {
    # 1.0 audio keeps transformers' model but ships this feature extractor: Wav2Vec2FeatureExtractor's
    # variance epsilon is 1e-7, d2v's and fairseq's 1e-5 (for quiet speech the difference is of the
    # order of the signal).
    "audio": CustomExport("Data2Vec2AudioModel", "Data2Vec2FeatureExtractor",
                          ("AutoFeatureExtractor", "AutoProcessor"), "Data2Vec2AudioFeaturePipeline", "audio",
                          _AUDIO_FIELDS, _audio_preprocessing, _audio_buffers, processor_for_v1=True),
    "image": CustomExport("Data2Vec2VisionModel", "Data2Vec2ImageProcessor", ("AutoImageProcessor",),
                          "Data2Vec2ImageFeaturePipeline", "image", _IMAGE_FIELDS, _image_preprocessing,
                          _image_buffers),
}
FIXED_BUFFERS = ("encoder.alibi.slopes", "encoder.sincos.table")
"""Buffers the modelling file loads with the weights; d2v recomputes them (not in its state dicts)."""
PREDICTION_MODULES = ("head", "decoder")
"""Student modules that only predict targets in pretraining: never part of an exported encoder."""


def is_custom(cfg: Any) -> bool:
    """Whether this config exports to d2v's modelling file (2.0 audio and image)."""
    return cfg.model.drops_masked and cfg.model.modality in CUSTOM


def ships_code(cfg: Any) -> bool:
    """Whether the export carries the modelling file: for its model, or for its preprocessing."""
    entry = CUSTOM.get(cfg.model.modality)
    return is_custom(cfg) or (entry is not None and entry.processor_for_v1)


def processing_entries(modality: str) -> dict[str, Any]:
    """config.json entries naming the modelling file's preprocessing and pipeline."""
    e = CUSTOM[modality]
    return {"auto_map": {auto: f"{MODULE}.{e.pre_cls}" for auto in e.pre_autos},
            "custom_pipelines": {"feature-extraction": {"impl": f"{MODULE}.{e.pipe_cls}", "pt": ["AutoModel"],
                                                        "type": e.pipeline_input}}}


def custom_config(cfg: Any) -> dict[str, Any]:
    """config.json of a 2.0 audio or image export: every field explicit, the classes in auto_map."""
    m = cfg.model
    e = CUSTOM[m.modality]
    entries = processing_entries(m.modality)
    values = {key: _to_json(_get(cfg, dotted)) for key, dotted in _COMMON_FIELDS + e.fields}
    return {
        "architectures": [e.model_cls], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{MODULE}.Data2Vec2Config", "AutoModel": f"{MODULE}.{e.model_cls}",
                     **entries["auto_map"]},
        "custom_pipelines": entries["custom_pipelines"], "modality": m.modality, "dtype": "float32", **values}


def custom_model_fields(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The d2v `model.*` settings (dotted keys) a data2vec2 config.json fixes: the inverse of
    custom_config, for a directory that lost d2v_export.json (transformers' save_pretrained)."""
    e = CUSTOM.get(config.get("modality"))
    if e is None:
        raise ValueError(f"{path} has modality {config.get('modality')!r}; d2v's data2vec2 models are "
                         f"{sorted(CUSTOM)}")
    pairs = _COMMON_FIELDS + e.fields
    missing = [key for key, _ in pairs if key not in config]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it was not written by d2v's export (or was edited)")
    # the modelling file's blocks are post-LN only
    return {"model.modality": config["modality"], "model.layer_norm_first": False, "model.v2.enabled": True,
            **{dotted: _from_json(config[key]) for key, dotted in pairs}}


STOCK_PRENET_KEY = "data2vec2_prenet_layers"
"""config.json key of a 2.0 model in a stock class (text): present only there, the number of its
first blocks that are d2v's prenet. It survives transformers' save_pretrained, so a re-saved copy
is still read as 2.0."""


def stock_v2_entries(cfg: Any) -> dict[str, Any]:
    """config.json entries that mark a stock class holding a 2.0 model."""
    return {STOCK_PRENET_KEY: cfg.model.v2.prenet_depth} if cfg.model.drops_masked else {}


def stock_v2_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The method settings of a stock config.json: 2.0 with its prenet split off when marked, else 1.0."""
    prenet = config.get(STOCK_PRENET_KEY)
    if prenet is None:
        return {"model.v2.enabled": False}
    return {"model.v2.enabled": True, "model.v2.prenet_depth": prenet,
            "model.depth": config["num_hidden_layers"] - prenet}


def _get(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _to_json(value: Any) -> Any:
    return [_to_json(v) for v in value] if isinstance(value, (list, tuple)) else value


def _from_json(value: Any) -> Any:
    """JSON lists as the tuples d2v's config holds (so they compare equal to a run's)."""
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def custom_preprocessing(cfg: Any) -> tuple[str, dict[str, Any]]:
    """preprocessor_config.json: the modelling file's processors, set as d2v's data pipeline is
    (every audio export, 2.0 image)."""
    e = CUSTOM[cfg.model.modality]
    kind = "feature_extractor_type" if "AutoFeatureExtractor" in e.pre_autos else "image_processor_type"
    return "preprocessor_config.json", {"auto_map": processing_entries(cfg.model.modality)["auto_map"],
                                        kind: e.pre_cls, **e.preprocessing(cfg)}


def fixed_buffers(cfg: Any) -> dict[str, Any]:
    """The fixed tensors the modelling file reads from the weights, from d2v's own definitions."""
    return CUSTOM[cfg.model.modality].buffers(cfg)


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
