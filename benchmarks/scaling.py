#!/usr/bin/env python
"""Scaling study: one preset over world sizes and ZeRO stages (± an offloaded teacher).

  python benchmarks/scaling.py --preset audio_tiny --world-sizes 1,2 --zero 1,2,3 [--teacher-offload]

Each (world size, stage) runs benchmarks/throughput.py through the deepspeed launcher and its
JSON record is collected. Writes a Markdown table and PNG plots (throughput and per-rank memory
against world size, one line per stage; scaling efficiency) to benchmarks/results/. On a CPU with
fewer cores than ranks, throughput says nothing about scaling: there the study reports per-rank
memory (measured and counted) and the communication volume per step only, and says so.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile

# d2v from this checkout.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.common import RESULTS, ROOT, machine, table, write_record  # noqa: E402

TEMPLATES = {1: "zero1.json", 2: "zero2.json", 3: "zero3.json"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(preset: str, world: int, stage: int, args, out_dir: str) -> dict | None:
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    on_cpu = args.cpu
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if on_cpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
    template = args.ds_config_dir and os.path.join(args.ds_config_dir, TEMPLATES[stage]) or \
        os.path.join(ROOT, "ds_configs", TEMPLATES[stage])
    cmd = [deepspeed, "--num_gpus", str(world), "--master_port", str(_port()),
           os.path.join(ROOT, "benchmarks", "throughput.py"), "--preset", preset, "--ds_config", template,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out-dir", out_dir, *args.overrides]
    if args.micro_batch:
        cmd += ["--micro-batch", str(args.micro_batch)]
    if args.teacher_offload:
        cmd.append("teacher.offload=cpu")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    records = sorted(glob.glob(os.path.join(out_dir, "throughput-*.json")), key=os.path.getmtime)
    if proc.returncode != 0 or not records:
        print(f"world {world} ZeRO-{stage}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    with open(records[-1]) as f:
        return json.load(f)


def counted(preset: str, world: int, stage: int, offload: bool, overrides: list[str]) -> dict:
    from d2v.estimate.comm import comm_per_step
    from d2v.config import apply_overrides, get_preset
    from d2v.estimate.memory import per_rank_memory

    cfg = apply_overrides(get_preset(preset), overrides)
    mem = per_rank_memory(cfg, world_size=world, stage=stage, teacher_offload=offload)
    import torch

    from d2v.models import build_model
    from d2v.teacher import Teacher

    with torch.device("meta"):
        student = build_model(cfg)
        teacher = Teacher(student, cfg.teacher)
    comm = comm_per_step(student.num_parameters(), sum(p.numel() for p in teacher.model.parameters()),
                         world_size=world, stage=stage, precision=cfg.train.precision, grad_accum=cfg.train.grad_accum)
    device_bytes = mem.student_params + mem.gradients + (0 if mem.optimizer_on_host else mem.optimizer_state) \
        + mem.teacher_device
    return {"counted_device_bytes": device_bytes, "comm_bytes_per_step": comm.total, **{
        f"comm_{k}": v for k, v in comm.as_dict().items()}}


def plot(rows: list[dict], path: str, throughput_valid: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("counted_device_bytes", "counted device bytes per rank (MiB)", 2**20),
              ("peak_memory_bytes", "measured peak memory per rank (MiB)", 2**20),
              ("comm_bytes_per_step", "communication per rank and step (MiB)", 2**20)]
    if throughput_valid:
        panels = [("samples_per_s", "samples/s", 1), ("efficiency", "scaling efficiency", 1)] + panels
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label, scale) in zip(axes, panels):
        for stage in sorted({r["zero_stage"] for r in rows}):
            pts = sorted((r["world_size"], r[key] / scale) for r in rows if r["zero_stage"] == stage and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"ZeRO-{stage}")
        ax.set_xlabel("ranks")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(sorted({r["world_size"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--world-sizes", default="1,2")
    ap.add_argument("--zero", default="1,2,3")
    ap.add_argument("--teacher-offload", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--ds-config-dir", default=None, help="directory with zero{1,2,3}.json (default ds_configs/)")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--cpu", action="store_true", default=None, help="force CPU ranks (default: when no GPU)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.cpu is None:
        import torch

        args.cpu = not torch.cuda.is_available()
    worlds = [int(w) for w in args.world_sizes.split(",")]
    stages = [int(z) for z in args.zero.split(",")]
    cores = os.cpu_count() or 1
    throughput_valid = not args.cpu or max(worlds) <= cores
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for world in worlds:
            for stage in stages:
                out = os.path.join(scratch, f"w{world}z{stage}")
                os.makedirs(out)
                rec = launch(args.preset, world, stage, args, out)
                row = {"world_size": world, "zero_stage": stage,
                       **counted(args.preset, world, stage, args.teacher_offload, args.overrides)}
                if rec is not None:
                    row.update(samples_per_s=rec["samples_per_s"], step_time_s=rec["step_time_s"],
                               peak_memory_bytes=rec["peak_memory_bytes"], mfu=rec["mfu"])
                rows.append(row)
    base = {r["zero_stage"]: r.get("samples_per_s") for r in rows if r["world_size"] == min(worlds)}
    for r in rows:
        b = base.get(r["zero_stage"])
        if throughput_valid and b and r.get("samples_per_s"):
            r["efficiency"] = r["samples_per_s"] / (b * r["world_size"] / min(worlds))
    note = ("" if throughput_valid else
            f"CPU run with {cores} cores for up to {max(worlds)} ranks: throughput is not meaningful here, "
            f"so only memory and communication volume are reported.")
    columns = [("world_size", "ranks", "{}"), ("zero_stage", "ZeRO", "{}"),
               ("counted_device_bytes", "counted bytes/rank", "{:.3g}"),
               ("peak_memory_bytes", "measured peak/rank", "{:.3g}"),
               ("comm_bytes_per_step", "comm bytes/step/rank", "{:.3g}")]
    if throughput_valid:
        columns += [("samples_per_s", "samples/s", "{:.2f}"), ("efficiency", "efficiency", "{:.0%}"),
                    ("mfu", "MFU", "{:.1%}")]
    md = f"# Scaling: {args.preset}{' (teacher offloaded)' if args.teacher_offload else ''}\n\n"
    md += (note + "\n\n" if note else "") + table(rows, columns) + "\n"
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"scaling-{args.preset}{'-offload' if args.teacher_offload else ''}")
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(rows, stem + ".png", throughput_valid)
    record = {"preset": args.preset, "rows": rows, "throughput_valid": throughput_valid, "note": note,
              "teacher_offload": args.teacher_offload, "machine": machine()}
    path = write_record("scaling", record, args.out_dir)
    print(md)
    print(f"table: {stem}.md\nplot: {stem}.png\nrecord: {path}")
    return record


if __name__ == "__main__":
    main()
