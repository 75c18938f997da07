"""`python -m d2v describe PRESET [--json]`: sizes and analytic FLOPs of a preset (docs/method.md §7)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from d2v.config import apply_overrides, get_preset
from d2v.estimate.flops import flops_per_sample, kept_per_clone
from d2v.models import build_model
from d2v.config.modalities import modality_spec


def describe(preset: str, overrides: list[str] | None = None, seconds: float = 10.0, *,
             world_size: int | None = None, zero: int | None = None, teacher_offload: bool = False,
             persistence_threshold: int = 100_000) -> dict[str, Any]:
    from d2v.teacher import Teacher

    cfg = apply_overrides(get_preset(preset), overrides or []).validate()
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    info: dict[str, Any] = {
        "preset": preset,
        "modality": cfg.model.modality,
        "student_trainable_parameters": student.num_parameters(),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "teacher_ema_parameters": sum(p.numel() for n, p in teacher.model.named_parameters() if n in teacher.ema_names),
    }
    spec = modality_spec(cfg.model.modality)
    if spec.varies_in_length:
        sr = cfg.model.audio.sample_rate
        info[f"{spec.position_name}_per_second"] = spec.positions(cfg.model, sr)
        info["sample_seconds"] = seconds
        info["flops_per_second_of_audio"] = flops_per_sample(cfg, 1.0).as_dict()
    length = spec.positions(cfg.model, int(seconds * cfg.model.audio.sample_rate) if spec.varies_in_length else None)
    info[f"{spec.position_name}_per_sample"] = length
    if cfg.model.drops_masked:
        info["v2_masks_per_sample"] = cfg.model.v2.num_masks
        info["v2_kept_tokens_per_clone"] = kept_per_clone(cfg, length)
        info["decoder_parameters"] = sum(p.numel() for p in student.decoder.parameters())
    info["flops_per_sample"] = flops_per_sample(cfg, seconds).as_dict()
    if world_size is not None or zero is not None:
        from d2v.estimate.memory import per_rank_memory

        mem = per_rank_memory(cfg, world_size=world_size or 1, stage=zero if zero is not None else 0,
                              teacher_offload=teacher_offload, persistence_threshold=persistence_threshold)
        info["memory_per_rank"] = {"world_size": world_size or 1, "zero_stage": zero or 0,
                                   "teacher_offload": teacher_offload, "precision": cfg.train.precision,
                                   **mem.as_dict()}
    return info


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m d2v describe", description=__doc__)
    ap.add_argument("preset")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--seconds", type=float, default=10.0, help="audio: utterance length for per-sample numbers")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--world-size", type=int, default=None, help="per-rank memory for this many data-parallel ranks")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage for the memory table")
    ap.add_argument("--teacher-offload", action="store_true", help="teacher weights in host memory")
    ap.add_argument("--persistence-threshold", type=int, default=100_000,
                    help="ZeRO-3 stage3_param_persistence_threshold (parameters below it stay gathered)")
    args = ap.parse_args(argv)
    info = describe(args.preset, args.overrides, args.seconds, world_size=args.world_size, zero=args.zero,
                    teacher_offload=args.teacher_offload, persistence_threshold=args.persistence_threshold)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "memory_per_rank":
            print(f"{key}:")
            for k, v in value.items():
                shown = f"{v / 2**20:,.1f} MiB" if isinstance(v, int) and not isinstance(v, bool) and k not in (
                    "world_size", "zero_stage") else v
                print(f"  {k:<22} {shown}")
        elif isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<18} {_fmt(v)}FLOP")
        elif isinstance(value, int) and value > 10_000:
            print(f"{key:<30} {value:,} ({_fmt(value)})")
        else:
            print(f"{key:<30} {value}")
