"""Shared by the cluster-operations tests: a small ZeRO-3 run and a full dump of its state."""
from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def zero3_template(threshold: int = 0) -> dict:
    from d2v.config import load_template

    t = load_template(os.path.join(ROOT, "ds_configs", "zero3.json"))
    t["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    return t


def cluster_config(out_dir: str, steps: int):
    from d2v.config import resolve

    return resolve("audio_tiny", overrides=[
        "train.precision=fp32", f"train.max_steps={steps}", "train.save_every=3", f"train.out_dir={out_dir}",
        "model.dropout=0", "model.attention_dropout=0", "train.log_every=3", "train.micro_batch_size=2"])


def dump_state(trainer) -> dict:
    """Full fp32 weights and Adam moments of every student parameter, the LR, the step and the
    teacher. Collective under ZeRO-3: every rank calls it; every rank gets the result."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    student = {}
    for name, p in trainer.student.named_parameters():
        if trainer.zero_stage == 3 or trainer.zero_stage in (1, 2):
            student[name] = tuple(t.detach().float().cpu().clone() for t in (
                safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
                safe_get_full_optimizer_state(p, "exp_avg_sq")))
        else:
            student[name] = (p.detach().float().cpu().clone(),)
    return {"student": student, "teacher": trainer.teacher.export_state(), "step": trainer.step,
            "lr": float(trainer.scheduler.get_last_lr()[0])}


def max_state_diff(a: dict, b: dict) -> float:
    diffs = [abs(a["step"] - b["step"]), abs(a["lr"] - b["lr"])]
    for name in a["student"]:
        diffs += [float((x - y).abs().max()) for x, y in zip(a["student"][name], b["student"][name])]
    diffs += [float((a["teacher"][k] - b["teacher"][k]).abs().max()) for k in a["teacher"]]
    return max(diffs)
