"""A transformers-format directory from d2v weights (`python -m d2v export CKPT OUT --format hf`).

Writes what `AutoModel.from_pretrained(OUT)` reads: config.json (every structural field explicit),
model.safetensors; the preprocessing settings (feature extractor or image processor JSON) or the
tokenizer (text); and d2v_export.json, which records where every weight came from and the full d2v
config, so `--init-from OUT` restores the exact run settings. 1.0 models and 2.0 text load into
transformers' Data2Vec{Audio,Vision,Text}Model; 2.0 audio and image into the modelling file the
export copies beside them (d2v/interop/hf_v2.py: `trust_remote_code=True`).

The text model is written without transformers' pooler (d2v has none): load it with
`Data2VecTextModel.from_pretrained(OUT, add_pooling_layer=False)`, as transformers' own task
models (masked LM, classification) do.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from d2v.interop.hf_layout import d2v_to_hf_name, hf_config, hf_layout, is_v2
from d2v.interop.hf_v2 import (MODELING_FILE, PREDICTION_MODULES, TEMPLATE, custom_config, custom_preprocessing,
                               fixed_buffers, is_custom, processing_entries, ships_code, to_stock_depth)

WEIGHTS = "model.safetensors"
META = "d2v_export.json"
SPM_FILE = "sentencepiece.model"
TOKENIZER_JSON = "tokenizer.json"


def _module_of(name: str) -> str:
    """'encoder.pos_conv.layers.0.conv.weight' -> 'encoder.pos_conv'; 'frontend.x.y' -> 'frontend'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "encoder" else parts[0]


def to_hf_state(cfg: Any, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor] | None = None
                ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(transformers state dict, d2v modules taken from the student, d2v parameters not exported).

    With `teacher`, its weights replace the student's; the parts the teacher lacks (the audio
    CNN and projection, the text embeddings, the mask embedding) come from the student.
    """
    modality = cfg.model.modality
    merged = dict(student)
    from_student: list[str] = []
    if teacher is not None:
        unknown = sorted(set(teacher) - set(student))
        if unknown:
            raise KeyError(f"teacher weights {unknown[:5]} are not student parameters: the checkpoint does not fit "
                           f"its config")
        merged.update(teacher)
    custom = is_custom(cfg)
    shapes = {} if custom else hf_layout(modality).shapes
    prenet = cfg.model.v2.prenet_depth if is_v2(cfg) else 0
    out, dropped = {}, []
    for name, tensor in merged.items():
        if name.split(".")[0] in PREDICTION_MODULES:
            dropped.append(name)
            continue
        # d2v's modelling file keeps d2v's names; a stock class has its own
        hf_name = name if custom else d2v_to_hf_name(modality, to_stock_depth(name, prenet))
        if hf_name is None:
            raise KeyError(f"d2v parameter {name!r} has no transformers counterpart; the {modality} layout "
                           f"in d2v/interop/hf_layout.py is out of date")
        shape = shapes.get(hf_name)
        t = tensor.detach().float().cpu()
        out[hf_name] = (t.reshape(shape) if shape else t).contiguous()
        if teacher is not None and name not in teacher:
            module = _module_of(name)
            if module not in from_student:
                from_student.append(module)
    if custom:
        out.update({k: v.float().contiguous() for k, v in fixed_buffers(cfg).items()})
    return out, from_student, dropped


def preprocessing(cfg: Any) -> tuple[str, dict[str, Any]] | None:
    """(file name, JSON) of transformers' preprocessing settings (audio and images; text ships its tokenizer)."""
    if ships_code(cfg):
        return custom_preprocessing(cfg)
    return hf_layout(cfg.model.modality).preprocessing(cfg)


def find_tokenizer(cfg: Any) -> str | None:
    """The tokenizer file the run's text shards were made with (recorded beside them), if still there."""
    pattern = cfg.data.train_shards
    if not pattern:
        return None
    from d2v.data.text import load_tokenizer_meta

    try:
        meta = load_tokenizer_meta(pattern)
    except FileNotFoundError:
        return None
    path = os.path.join(os.path.dirname(pattern.split("{")[0]), meta.get("file", ""))
    return path if os.path.isfile(path) else None


def tokenizer_info(cfg: Any, path: str) -> Any:
    """d2v's TokenizerInfo of `path`; raises unless it fits the model's embedding and special ids."""
    from d2v.data.tokenizer import Tokenizer

    t = cfg.model.text
    info = Tokenizer(path).info
    want = (t.vocab_size, t.pad_id, t.bos_id, t.eos_id, t.unk_id, t.vocab_size - 1)
    got = (info.vocab_size, info.pad_id, info.bos_id, info.eos_id, info.unk_id, info.mask_id)
    if got != want:
        raise ValueError(f"tokenizer {path} has (vocab, pad, bos, eos, unk, mask) = {got}, the model {want}: "
                         f"pass the tokenizer the run was trained with")
    return info


def with_sequence_marks(tokenizer_json: str, info: Any) -> str:
    """The tokenizer JSON with RoBERTa's template: a text encodes as <s> ids </s>, as d2v's text
    shards start a block with <s> and end every document with </s> (data/prepare_text.py); d2v's
    own Tokenizer encodes without special tokens, so the template changes nothing for d2v."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tokenizer_json)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", info.bos_id), ("</s>", info.eos_id)])
    return tok.to_str()


def write_tokenizer(cfg: Any, path: str, out: str) -> dict[str, Any]:
    """Copies the tokenizer and writes tokenizer_config.json (transformers' loader reads it)."""
    t = cfg.model.text
    info = tokenizer_info(cfg, path)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "mask_token": "<mask>", "model_max_length": t.max_positions}
    if info.kind == "bpe":
        with open(path, encoding="utf-8") as f:
            text = with_sequence_marks(f.read(), info)
        with open(os.path.join(out, TOKENIZER_JSON), "w", encoding="utf-8") as f:
            f.write(text)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    else:
        from d2v.interop.spm_json import equivalent_tokenizer_json

        # The SentencePiece model itself (its ids are d2v's: no fairseq offset, <mask> one past the
        # last piece), plus a tokenizer.json transformers can load when it encodes identically.
        shutil.copyfile(path, os.path.join(out, SPM_FILE))
        config = {"d2v_tokenizer": f"{SPM_FILE}: ids are the SentencePiece ids, <mask> is id "
                                   f"{info.mask_id} (one past the last piece)", **specials}
        text = equivalent_tokenizer_json(path, info.mask_id)
        if text is not None:
            text = with_sequence_marks(text, info)
            with open(os.path.join(out, TOKENIZER_JSON), "w", encoding="utf-8") as f:
                f.write(text)
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return info.as_dict()


def exported_tokenizer(directory: str) -> str | None:
    """The tokenizer a text export ships, in the file d2v's Tokenizer reads: the SentencePiece
    model itself where there is one (its tokenizer.json is only an equivalent), else tokenizer.json."""
    for name in (SPM_FILE, TOKENIZER_JSON):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def write_hf(out: str, cfg: Any, student: dict[str, torch.Tensor], *, teacher: dict[str, torch.Tensor] | None = None,
             tokenizer: str | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes a transformers directory; with `teacher`, the EMA teacher's weights. Returns the metadata."""
    from safetensors.torch import save_file

    from d2v.config import to_dict

    if is_custom(cfg):
        config = custom_config(cfg)
    else:
        config = hf_config(cfg)
        if ships_code(cfg):  # transformers' model with d2v's preprocessing
            config.update(processing_entries(cfg.model.modality))
    tok_path = None
    if hf_layout(cfg.model.modality).needs_tokenizer:
        tok_path = tokenizer or find_tokenizer(cfg)
        if tok_path is None:
            raise FileNotFoundError(f"the tokenizer of this text run was not found beside "
                                    f"data.train_shards={cfg.data.train_shards!r}: pass --tokenizer FILE")
        tokenizer_info(cfg, tok_path)  # before anything is written
    state, from_student, dropped = to_hf_state(cfg, student, teacher)
    os.makedirs(out, exist_ok=True)
    weights = "teacher" if teacher is not None else "student"
    save_file(state, os.path.join(out, WEIGHTS), metadata={"format": "pt", "d2v_weights": weights})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if ships_code(cfg):
        shutil.copyfile(TEMPLATE, os.path.join(out, MODELING_FILE))
    pre = preprocessing(cfg)
    if pre is not None:
        with open(os.path.join(out, pre[0]), "w") as f:
            json.dump(pre[1], f, indent=2)
    meta: dict[str, Any] = {"format": "hf", "weights": weights, "architecture": config["architectures"][0],
                            "not_exported": dropped, **(source or {})}
    if teacher is not None:
        meta["taken_from_student"] = from_student
        meta["note"] = ("the EMA teacher has no copy of these modules (it consumes the student's output or shares "
                        "them with the student), so the student's weights were written for them")
    if tok_path is not None:
        meta["tokenizer"] = write_tokenizer(cfg, tok_path, out)
    meta["d2v_config"] = to_dict(cfg)
    with open(os.path.join(out, META), "w") as f:
        json.dump(meta, f, indent=2)
    return meta
