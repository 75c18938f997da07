"""`python -m d2v import-fairseq CKPT OUT [--format plain|hf]`: reference data2vec checkpoints into d2v.

Reads, without fairseq or omegaconf and without running any code in the file (d2v.safe_load with
d2v.safe_load.unpickle's inert records), fairseq data2vec 1.0 audio and text checkpoints and the
BEiT-based data2vec_vision checkpoints; maps the student and the EMA teacher
(fairseq: `model['_ema']` or `model['encoder._ema']`; BEiT: `model_ema`) into d2v's layout; writes
a d2v plain export (student.safetensors, teacher.safetensors, config.json; `--init-from` and
`load_exported` read it) or a transformers directory. Anything it cannot place is refused by name.

Text rows follow fairseq's dict.txt order: `--dict dict.txt --encoder-json encoder.json
--vocab-bpe vocab.bpe` (default: those files beside CKPT) are required, and the rows are moved
to the tokenizer's ids (a given `--tokenizer` JSON, or one built from encoder.json/vocab.bpe).

data2vec 2.0 (`data2vec_multi`, one modality) checkpoints map into d2v's 2.0 model (presets `*_v2`):
fused qkv split, the learned per-head ALiBi scale, prenet and decoder included; the fixed sin-cos
table is left behind (d2v recomputes it).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from torch import Tensor

from d2v import safe_load
from d2v.interop.fairseq_layout import (FAIRSEQ_LAYOUTS, ImportRefused, attention_heads, count_blocks,
                                        fairseq_layout, map_state, modality_section, setting, strip_prefix, to_float)
from d2v.interop.fairseq_method import apply_method, v2_sections
from d2v.safe_load.unpickle import to_plain


def detect(ckpt: dict[str, Any]) -> tuple[str, dict[str, Tensor]]:
    """(kind, model state): kind is a FAIRSEQ_LAYOUTS modality (1.0) or v2."""
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise ImportRefused(f"no 'model' state dict in the checkpoint (top-level keys: {sorted(ckpt)[:10]})")
    state = strip_prefix(state, ("w2v_encoder.w2v_model.", "module."))
    keys = list(state)
    if any(k.startswith("modality_encoders.") for k in keys):
        return "v2", state
    for name, layout in FAIRSEQ_LAYOUTS.items():
        if layout.detects(state):
            return name, state
    raise ImportRefused(f"not a data2vec checkpoint d2v can read; first keys: {keys[:8]}")


def build_config(kind: str, student: dict[str, Tensor], cfg_tree: dict[str, Any], *, vocab_size: int | None = None,
                 notes: list[str] | None = None):
    """The d2v config whose student has exactly these weights (sizes read from the weights) and
    the checkpoint's own method where its cfg states it (fairseq_method); `notes` gets what was read."""
    notes = [] if notes is None else notes
    from d2v.config import get_preset

    layout = fairseq_layout(kind)
    root = layout.settings_root
    model_cfg = cfg_tree if root is None else cfg_tree.get(root, cfg_tree)
    width = student["encoder.blocks.0.ffn.fc1.weight"].shape[1]
    # The recipe (masking, teacher, loss, optimizer) of the nearest preset; sizes from the weights.
    cfg = get_preset(f"{kind}_{ {768: 'base', 1024: 'large'}.get(width, 'tiny') }")
    m = cfg.model
    m.depth = count_blocks(student, "encoder.blocks.")
    m.ffn_dim, m.embed_dim = student["encoder.blocks.0.ffn.fc1.weight"].shape
    layout.config(m, student, model_cfg, vocab_size)
    notes += layout.method(cfg, cfg_tree)
    cfg.teacher.top_k = min(cfg.teacher.top_k, m.depth)
    return cfg.validate()


def teacher_from(cfg: Any, student: dict[str, Tensor], mapped_ema: dict[str, Tensor] | None
                 ) -> tuple[dict[str, Tensor], list[str]]:
    """The d2v teacher state: averaged parts from the EMA, copied parts from the student. Notes say which."""
    from d2v.models import build_model
    from d2v.teacher import Teacher

    model = build_model(cfg)
    teacher = Teacher(model, cfg.teacher)
    notes = []
    state: dict[str, Tensor] = {}
    if mapped_ema is None:
        notes.append("the checkpoint has no EMA teacher: the teacher is a copy of the student")
    from_student = []
    for name in teacher.ema_names + teacher.copy_names:
        if mapped_ema is not None and name in mapped_ema and name in teacher.ema_names:
            state[name] = mapped_ema[name].float()
        else:
            state[name] = student[name].float()
            if mapped_ema is not None:
                from_student.append(name)
    if from_student:
        mods = sorted({".".join(n.split(".")[:2]) for n in from_student})
        notes.append(f"teacher parameters taken from the student (d2v copies them from the student every step, "
                     f"or the EMA lacks them): {mods}")
    if mapped_ema is not None:
        unused = sorted(set(mapped_ema) - set(state))
        if unused:
            mods = sorted({".".join(n.split(".")[:2]) for n in unused})
            notes.append(f"EMA weights of modules the d2v teacher does not hold (not written): {mods}")
    return state, notes


def _check_complete(cfg: Any, student: dict[str, Tensor]) -> None:
    from d2v.models import build_model

    expected = build_model(cfg).state_dict()
    missing = sorted(set(expected) - set(student))
    unexpected = sorted(set(student) - set(expected))
    mismatched = [f"{k}: {tuple(student[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in expected if k in student and student[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ImportRefused(f"the mapped weights do not form a d2v {cfg.model.modality} model: missing {missing}, "
                            f"unexpected {unexpected}, mismatched {mismatched}")


def convert(path: str, *, dict_path: str | None = None, encoder_json: str | None = None,
            vocab_bpe: str | None = None, tokenizer: str | None = None) -> dict[str, Any]:
    """Reads and maps a reference checkpoint: {cfg, student, teacher, notes, tokenizer_json}."""
    ckpt = safe_load.load(path, records=True)
    if not isinstance(ckpt, dict):
        raise ImportRefused(f"{path} does not hold a checkpoint dict")
    kind, state = detect(ckpt)
    cfg_tree = to_plain(ckpt.get("cfg")) or to_plain(ckpt.get("args")) or {}
    if not isinstance(cfg_tree, dict):
        cfg_tree = {}
    text_files = {"dict_path": dict_path, "encoder_json": encoder_json, "vocab_bpe": vocab_bpe,
                  "tokenizer": tokenizer}
    if kind == "v2":
        return _convert_v2(path, ckpt, state, cfg_tree, text_files)
    layout = fairseq_layout(kind)
    state = dict(state)
    ema = layout.ema(ckpt, state)
    student, unused, unmapped = map_state(kind, state)
    if unmapped:
        raise ImportRefused(f"{path}: keys d2v cannot map into its {kind} model: {unmapped}")
    notes = [f"left behind (buffers d2v recomputes): {unused}"] if unused else []
    mapped_ema = None
    if ema is not None:
        mapped_ema, _, ema_unmapped = map_state(kind, ema)
        if ema_unmapped:
            raise ImportRefused(f"{path}: EMA keys d2v cannot map: {ema_unmapped}")
    tokenizer_json, vocab_size = None, None
    if layout.dict_rows:
        student, tokenizer_json, vocab_size = _text_student(path, student, text_files, notes)
    student = to_float(student)
    cfg = build_config(kind, student, cfg_tree, vocab_size=vocab_size, notes=notes)
    _check_complete(cfg, student)
    teacher, teacher_notes = teacher_from(cfg, student, mapped_ema)
    return {"cfg": cfg, "student": student, "teacher": teacher, "notes": notes + teacher_notes,
            "tokenizer_json": tokenizer_json, "kind": kind}


def _beside(path: str, given: str | None, name: str) -> str | None:
    if given is not None:
        return given
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    return candidate if os.path.isfile(candidate) else None


def _text_student(path: str, student: dict, text_files: dict, notes: list[str]):
    """Embedding rows moved from dict.txt order to the tokenizer's ids; (student, tokenizer json, vocab size)."""
    student, tokenizer_json, text_notes = _remap_text(path, student, **text_files)
    notes += text_notes
    words = student["frontend.word_embeddings.weight"]
    # fairseq's RoBERTa layout has no token-type embedding; d2v's single one is zero (no effect).
    student["frontend.token_type_embeddings.weight"] = torch.zeros(1, words.shape[1])
    notes.append("frontend.token_type_embeddings set to zeros (fairseq has none)")
    return student, tokenizer_json, words.shape[0]


def _remap_text(path, student, *, dict_path, encoder_json, vocab_bpe, tokenizer):
    from d2v.interop.gpt2_dict import build_gpt2_tokenizer, fairseq_symbols, remap_rows

    dict_path = _beside(path, dict_path, "dict.txt")
    encoder_json = _beside(path, encoder_json, "encoder.json")
    vocab_bpe = _beside(path, vocab_bpe, "vocab.bpe")
    if dict_path is None or encoder_json is None or (vocab_bpe is None and tokenizer is None):
        raise ImportRefused("a fairseq text checkpoint indexes its embedding by dict.txt order: pass --dict dict.txt "
                            "--encoder-json encoder.json --vocab-bpe vocab.bpe (or put them beside the checkpoint) "
                            "so the rows can be moved to the tokenizer's ids; d2v will not pair them unmapped")
    rows = student["frontend.word_embeddings.weight"]
    symbols = fairseq_symbols(dict_path, rows.shape[0])
    if tokenizer is not None:
        with open(tokenizer, encoding="utf-8") as f:
            tokenizer_json = f.read()
    else:
        tokenizer_json = build_gpt2_tokenizer(encoder_json, vocab_bpe)
    remap = remap_rows(rows, symbols, encoder_json, tokenizer_json)
    student = dict(student)
    student["frontend.word_embeddings.weight"] = remap.rows
    notes = [f"word embedding rows moved from {os.path.basename(dict_path)} order to the tokenizer's ids "
             f"({rows.shape[0]} -> {remap.rows.shape[0]} rows)"]
    if remap.dropped_symbols:
        notes.append(f"dict.txt symbols the tokenizer cannot produce, rows not kept: {remap.dropped_symbols[:10]}"
                     f"{'...' if len(remap.dropped_symbols) > 10 else ''} ({len(remap.dropped_symbols)})")
    if remap.filled_from_unk:
        notes.append(f"tokenizer tokens without a dict.txt row, given the <unk> row: {remap.filled_from_unk[:10]}"
                     f"{'...' if len(remap.filled_from_unk) > 10 else ''} ({len(remap.filled_from_unk)})")
    return student, tokenizer_json, notes


def _convert_v2(path: str, ckpt: dict[str, Any], state: dict[str, Tensor], cfg_tree: dict[str, Any],
                text_files: dict[str, Any]) -> dict[str, Any]:
    from d2v.config import list_presets
    from d2v.interop.fairseq_layout import map_v2_state

    encoders = sorted({k.split(".")[1] for k in state if k.startswith("modality_encoders.")})
    if not any(p.endswith("_v2") for p in list_presets()):
        raise ImportRefused(f"a data2vec 2.0 checkpoint (data2vec_multi, modality encoders {encoders}): importing "
                            f"2.0 needs d2v's 2.0 model (presets *_v2), which this tree does not have")
    if len(encoders) != 1:
        raise ImportRefused(f"a data2vec 2.0 checkpoint with modality encoders {encoders}: d2v's models have one "
                            f"modality; it imports checkpoints with exactly one")
    state = dict(state)
    ema = state.pop("_ema", None)
    if ema is None:
        ema = ckpt.get("_ema")
    modality, student, unused, unmapped = map_v2_state(state)
    if unmapped:
        raise ImportRefused(f"{path}: keys d2v cannot map into its 2.0 {modality} model: {unmapped}")
    notes = [f"left behind (d2v recomputes them): {unused}"] if unused else []
    mapped_ema = None
    if ema is not None:
        ema = dict(ema)
        ema.pop("__sq_mom", None)
        if ema and all(k.split(".")[0].isdigit() for k in ema):
            # ema_encoder_only (fairseq's default, the text recipes): the EMA copies model.blocks
            # alone, so its keys have no `blocks.` prefix (data2vec2.py's make_ema_teacher).
            ema = {f"blocks.{k}": v for k, v in ema.items()}
            notes.append("the checkpoint's EMA holds the encoder blocks only (ema_encoder_only)")
        _, mapped_ema, _, ema_unmapped = map_v2_state(ema, encoders[0])
        if ema_unmapped:
            raise ImportRefused(f"{path}: EMA keys d2v cannot map: {ema_unmapped}")
    model_cfg = cfg_tree.get("model", cfg_tree)
    heads = attention_heads(model_cfg, "2.0")
    positions = [v for k, v in state.items() if k.endswith("fixed_positional_encoder.positions")]
    for target in (student, mapped_ema):
        if target is not None and "encoder.alibi.scale" in target:
            target["encoder.alibi.scale"] = _alibi_scale(target["encoder.alibi.scale"], heads)
    tokenizer_json, vocab_size = None, None
    if fairseq_layout(modality).dict_rows:
        student, tokenizer_json, vocab_size = _text_student(path, student, text_files, notes)
    student = to_float(student)
    cfg = build_v2_config(modality, student, model_cfg, heads, vocab_size=vocab_size,
                          num_patches=positions[0].shape[1] if positions else None, notes=notes, tree=cfg_tree)
    _check_complete(cfg, student)
    teacher, teacher_notes = teacher_from(cfg, student, mapped_ema)
    return {"cfg": cfg, "student": student, "teacher": teacher, "notes": notes + teacher_notes,
            "tokenizer_json": tokenizer_json, "kind": f"{modality}_v2"}


def _alibi_scale(scale: Tensor, heads: int) -> Tensor:
    """fairseq's L'×1×H'×1×1 learned ALiBi scale -> d2v's per-head vector (H)."""
    if scale.shape[0] != 1:
        raise ImportRefused(f"the checkpoint learns an ALiBi scale per layer ({tuple(scale.shape)}); d2v's 2.0 model "
                            f"has one per head")
    flat = scale.reshape(-1).float()
    return flat.expand(heads).clone() if flat.numel() == 1 else flat


# fairseq's D2vDecoderConfig.decoder_residual default (examples/data2vec/models/modalities/base.py).
FAIRSEQ_DECODER_RESIDUAL = True


def build_v2_config(modality: str, student: dict[str, Tensor], model_cfg: dict[str, Any], heads: int, *,
                    vocab_size: int | None = None, num_patches: int | None = None,
                    notes: list[str] | None = None, tree: dict[str, Any] | None = None):
    """The d2v 2.0 config whose student has exactly these weights."""
    from d2v.config import get_preset

    width = student["encoder.blocks.0.ffn.fc1.weight"].shape[1]
    cfg = get_preset(f"{modality}_{ {768: 'base', 1024: 'large'}.get(width, 'tiny') }_v2")
    m, v = cfg.model, cfg.model.v2
    m.depth = count_blocks(student, "encoder.blocks.")
    m.ffn_dim, m.embed_dim = student["encoder.blocks.0.ffn.fc1.weight"].shape
    m.num_heads = heads
    eps = setting(model_cfg, "norm_eps")
    if eps is not None:
        m.norm_eps = float(eps)
    v.prenet_depth = count_blocks(student, "encoder.prenet.")
    conv = student["decoder.layers.0.conv.weight"]
    v.decoder_layers = count_blocks(student, "decoder.layers.")
    v.decoder_dim, v.decoder_kernel, v.decoder_groups = conv.shape[0], conv.shape[-1], m.embed_dim // conv.shape[1]
    v.decoder_projection_layers = 2 if "decoder.proj.0.weight" in student else 1
    # The modality's own decoder section: every modality's defaults are in the saved cfg, and
    # audio's (residual) differs from the text recipes' (none).
    decoder = modality_section(model_cfg, fairseq_layout(modality).v2_encoder).get("decoder") or {}
    residual = decoder.get("decoder_residual")
    v.decoder_residual = FAIRSEQ_DECODER_RESIDUAL if residual is None else bool(residual)
    v.alibi = "encoder.alibi.scale" in student
    fairseq_layout(modality).config_v2(m, student, model_cfg, vocab_size=vocab_size, num_patches=num_patches)
    notes = [] if notes is None else notes
    tree = tree or {"model": model_cfg}
    notes += apply_method(cfg, v2_sections(cfg, tree, fairseq_layout(modality).v2_encoder), tree)
    cfg.teacher.top_k = min(cfg.teacher.top_k, m.depth)
    return cfg.validate()


def write_plain(out: str, cfg: Any, student: dict[str, Tensor], teacher: dict[str, Tensor], info: dict[str, Any]) -> None:
    """The layout of `python -m d2v export` (load_exported and --init-from read it)."""
    from safetensors.torch import save_file

    from d2v.config import to_dict

    os.makedirs(out, exist_ok=True)
    meta = {"format": "pt", "d2v_preset": cfg.name, "source": "fairseq import"}
    save_file({k: v.contiguous() for k, v in student.items()}, os.path.join(out, "student.safetensors"), metadata=meta)
    save_file({k: v.contiguous() for k, v in teacher.items()}, os.path.join(out, "teacher.safetensors"), metadata=meta)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(to_dict(cfg), f, indent=2)
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(info, f, indent=2)


def import_fairseq(path: str, out: str, *, fmt: str = "plain", teacher: bool = False, **text_files: Any) -> dict[str, Any]:
    result = convert(path, **text_files)
    cfg = result["cfg"]
    tok_file = None
    if result["tokenizer_json"] is not None:
        os.makedirs(out, exist_ok=True)
        tok_file = os.path.join(out, "tokenizer.json")
        with open(tok_file, "w", encoding="utf-8") as f:
            f.write(result["tokenizer_json"])
    info = {"source": os.path.abspath(path), "kind": result["kind"], "preset": cfg.name, "notes": result["notes"],
            "student_tensors": len(result["student"]), "teacher_tensors": len(result["teacher"])}
    if fmt == "hf":
        from d2v.interop.hf_export import write_hf

        meta = write_hf(out, cfg, result["student"], teacher=result["teacher"] if teacher else None,
                        tokenizer=tok_file, source={"imported_from": info["source"], "import_notes": result["notes"]})
        info["taken_from_student"] = meta.get("taken_from_student", [])
    else:
        if teacher:
            raise ValueError("--teacher applies to --format hf (the plain layout holds student and teacher)")
        write_plain(out, cfg, result["student"], result["teacher"], info)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m d2v import-fairseq", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="fairseq data2vec checkpoint (.pt) or data2vec_vision (BEiT) checkpoint")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--format", choices=("plain", "hf"), default="plain", help="d2v plain export or transformers")
    ap.add_argument("--teacher", action="store_true", help="--format hf: write the EMA teacher's weights")
    ap.add_argument("--dict", dest="dict_path", default=None, help="text: fairseq dict.txt (default: beside CKPT)")
    ap.add_argument("--encoder-json", default=None, help="text: GPT-2 encoder.json (default: beside CKPT)")
    ap.add_argument("--vocab-bpe", default=None, help="text: GPT-2 vocab.bpe (default: beside CKPT)")
    ap.add_argument("--tokenizer", default=None,
                    help="text: a tokenizers JSON to remap the rows to (default: built from encoder.json/vocab.bpe)")
    args = ap.parse_args(argv)
    info = import_fairseq(args.checkpoint, args.out, fmt=args.format, teacher=args.teacher, dict_path=args.dict_path,
                          encoder_json=args.encoder_json, vocab_bpe=args.vocab_bpe, tokenizer=args.tokenizer)
    print(json.dumps(info, indent=2))
