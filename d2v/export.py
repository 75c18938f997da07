"""`python -m d2v export CKPT OUT [--format plain|hf] [--teacher]`: plain fp32 safetensors of the
student and the teacher plus the resolved config, or (`--format hf`) a directory transformers'
AutoModel loads (student, or the EMA teacher with --teacher), from a checkpoint of any ZeRO
stage, without a distributed launch.

The student's fp32 weights are DeepSpeed's fp32 master weights where it keeps them (ZeRO 1/2/3
partitions, merged with DeepSpeed's zero_to_fp32 reader; the stage-0 bf16 optimizer's fp32
groups), else the module's own weights. The teacher is already stored in fp32 and in a
world-size-independent form (teacher.pt).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any

import torch

from d2v import safe_load
from d2v.config import from_dict
from d2v.config.schema import D2vConfig
from d2v.train.checkpoint import checked_tag

FILES = ("student.safetensors", "teacher.safetensors", "config.json", "export.json")


def resolve_tag_dir(path: str, tag: str | None = None) -> str:
    """Accepts a run directory, its checkpoints directory or a tag directory."""
    if tag is not None:
        checked_tag(tag, "--tag")
    for root in (path, os.path.join(path, "checkpoints")):
        if tag is not None and os.path.isdir(os.path.join(root, tag)):
            return _complete(os.path.join(root, tag))
        latest = os.path.join(root, "latest")
        if tag is None and os.path.exists(latest):
            with open(latest) as f:
                return _complete(os.path.join(root, checked_tag(f.read().strip(), latest)))
    if os.path.exists(os.path.join(path, "COMPLETE")):
        return path
    raise FileNotFoundError(f"{path} holds no complete d2v checkpoint (no latest file, no COMPLETE marker)")


def _complete(tag_dir: str) -> str:
    """Only a checkpoint whose save finished (its COMPLETE marker) is read."""
    if not os.path.exists(os.path.join(tag_dir, "COMPLETE")):
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint (its save did not finish): export another "
                                f"tag with --tag")
    return tag_dir


def _fresh_out(out: str, overwrite: bool) -> None:
    """An export never replaces an earlier one unasked."""
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} already holds files (an earlier export?): choose another output folder or pass "
                              f"--overwrite to replace them")


def _stage0_fp32(tag_dir: str, cfg: D2vConfig) -> dict[str, torch.Tensor]:
    from d2v.models import build_model
    from d2v.train.trainer import param_group_names

    state = safe_load.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    module = {k: v.float() for k, v in state["module"].items()}
    groups = (state.get("optimizer") or {}).get("fp32_groups")
    if groups:  # bf16/fp16 at stage 0: the optimizer's fp32 masters, in param-group order
        with torch.device("meta"):
            names = param_group_names(build_model(cfg), cfg.optim.no_decay_1d)
        for group_names, tensors in zip(names, groups):
            for name, tensor in zip(group_names, tensors):
                module[name] = tensor.float().reshape(module[name].shape).clone()
    return module


def student_fp32(tag_dir: str, cfg: D2vConfig) -> dict[str, torch.Tensor]:
    if glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from d2v.train.safe_checkpoint_engine import guard_deepspeed_readers

        guard_deepspeed_readers()  # zero_to_fp32 reads the partitions with torch.load itself
        root, tag = os.path.split(tag_dir.rstrip("/"))
        sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
        return {k: v.float().contiguous() for k, v in sd.items()}
    return _stage0_fp32(tag_dir, cfg)


def export_checkpoint(path: str, out: str, tag: str | None = None, *, overwrite: bool = False) -> dict[str, Any]:
    from safetensors.torch import save_file

    tag_dir = resolve_tag_dir(path, tag)
    _fresh_out(out, overwrite)
    with open(os.path.join(tag_dir, "d2v_state.json")) as f:
        run_state = json.load(f)
    cfg = from_dict(run_state["config"])
    student = student_fp32(tag_dir, cfg)
    teacher = safe_load.load(os.path.join(tag_dir, "teacher.pt"))
    os.makedirs(out, exist_ok=True)
    meta = {"format": "pt", "d2v_preset": cfg.name, "step": str(run_state["step"])}
    save_file({k: v.contiguous() for k, v in student.items()}, os.path.join(out, "student.safetensors"), metadata=meta)
    save_file({k: v.float().contiguous() for k, v in teacher.items()}, os.path.join(out, "teacher.safetensors"),
              metadata=meta)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(run_state["config"], f, indent=2)
    info = {"checkpoint": os.path.abspath(tag_dir), "step": run_state["step"], "preset": cfg.name,
            "world_size": run_state["world_size"], "student_tensors": len(student), "teacher_tensors": len(teacher)}
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def export_hf_checkpoint(path: str, out: str, tag: str | None = None, *, teacher: bool = False,
                         tokenizer: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """A transformers-format directory (d2v.interop.hf_export) of the student or the EMA teacher."""
    from d2v.interop.hf_export import write_hf

    tag_dir = resolve_tag_dir(path, tag)
    _fresh_out(out, overwrite)
    with open(os.path.join(tag_dir, "d2v_state.json")) as f:
        run_state = json.load(f)
    cfg = from_dict(run_state["config"])
    student = student_fp32(tag_dir, cfg)
    teacher_state = None
    if teacher:
        teacher_state = safe_load.load(os.path.join(tag_dir, "teacher.pt"))
    source = {"checkpoint": os.path.abspath(tag_dir), "step": run_state["step"], "preset": cfg.name}
    meta = write_hf(out, cfg, student, teacher=teacher_state, tokenizer=tokenizer, source=source)
    return {k: v for k, v in meta.items() if k != "d2v_config"}


def load_exported(out: str):
    """(student Data2Vec in fp32 with the exported weights, teacher state dict, config)."""
    from d2v.models import build_model

    with open(os.path.join(out, "config.json")) as f:
        cfg = from_dict(json.load(f))
    student = build_model(cfg)
    student.load_state_dict(safe_load.load_safetensors(os.path.join(out, "student.safetensors")), strict=True)
    return student, safe_load.load_safetensors(os.path.join(out, "teacher.safetensors")), cfg


def load_student(path: str):
    """(student, config) from an export directory or a checkpoint (run dir, checkpoints dir or tag)."""
    if os.path.exists(os.path.join(path, "student.safetensors")):
        student, _, cfg = load_exported(path)
        return student, cfg
    from d2v.models import build_model

    tag_dir = resolve_tag_dir(path)
    with open(os.path.join(tag_dir, "d2v_state.json")) as f:
        cfg = from_dict(json.load(f)["config"])
    student = build_model(cfg)
    student.load_state_dict(student_fp32(tag_dir, cfg), strict=True)
    return student, cfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m d2v export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or a tag directory")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    ap.add_argument("--format", choices=("plain", "hf"), default="plain",
                    help="plain: student and teacher safetensors + d2v config; hf: a directory transformers' "
                         "AutoModel.from_pretrained reads (2.0 audio and image: with trust_remote_code=True)")
    ap.add_argument("--teacher", action="store_true",
                    help="--format hf: export the EMA teacher's weights instead of the student's")
    ap.add_argument("--tokenizer", default=None,
                    help="--format hf, text: the tokenizer file (default: the one beside the run's shards)")
    ap.add_argument("--overwrite", action="store_true", help="replace what the output folder holds")
    args = ap.parse_args(argv)
    if args.format == "hf":
        info = export_hf_checkpoint(args.checkpoint, args.out, args.tag, teacher=args.teacher,
                                    tokenizer=args.tokenizer, overwrite=args.overwrite)
        print(json.dumps(info, indent=2))
        return
    if args.teacher or args.tokenizer:
        ap.error("--teacher and --tokenizer apply to --format hf (the plain export holds student and teacher)")
    info = export_checkpoint(args.checkpoint, args.out, args.tag, overwrite=args.overwrite)
    print(json.dumps(info, indent=2))
