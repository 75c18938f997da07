#!/usr/bin/env python
"""Training throughput of a preset: real steps (student, teacher, targets, loss, optimizer, EMA)
on synthetic batches of the preset's shape.

  DS_ACCELERATOR=cpu python benchmarks/throughput.py --preset audio_tiny --ds_config ds_configs/cpu.json
  deepspeed --num_gpus 8 benchmarks/throughput.py --preset audio_base --ds_config ds_configs/zero2.json

Reports samples/s, frames|patches|tokens per second, the step split into data / student fwd /
student bwd / teacher fwd / targets / optimizer / EMA, achieved TFLOP/s counted analytically
(docs/method.md §6: teacher and audio CNN included) and MFU against a measured bf16 matmul peak (or
--peak-tflops), and peak memory per rank. Prints a table and writes a JSON record to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

# d2v from this checkout.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from benchmarks.common import machine, matmul_peak_tflops, peak_memory_bytes, sync, table, write_record  # noqa: E402

PHASES = ("data", "student_fwd", "student_bwd", "teacher_fwd", "targets", "optimizer", "ema")


class PhaseTimer:
    """Wraps the callables a training step goes through and sums wall time per phase."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._depth = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.totals[name] += time.perf_counter() - t0

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        setattr(obj, attr, timed)

    def reset(self) -> None:
        self.totals.clear()


def units_per_sample(cfg, seconds: float) -> tuple[str, int]:
    from d2v.shapes import conv_output_length

    m = cfg.model
    if m.modality == "audio":
        return "frames", conv_output_length(int(seconds * m.audio.sample_rate), m.audio.conv_layers)
    if m.modality == "image":
        return "patches", (m.image.image_size // m.image.patch_size) ** 2
    return "tokens", m.text.max_positions


def profile_activities() -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def top_ops(profiler, steps: int, count: int) -> list[dict[str, Any]]:
    """The operators with the most self time per step (device time on a GPU, else CPU time)."""
    on_gpu = torch.cuda.is_available()
    rows = []
    for e in profiler.key_averages():
        self_us = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        rows.append({"op": e.key, "self_ms_per_step": self_us / 1e3 / steps, "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    total = sum(r["self_ms_per_step"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["self_ms_per_step"] / total
    return rows[:count]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from d2v import kernels
    from d2v.config import load_template, resolve
    from d2v.data.synthetic import synthetic_batch
    from d2v.estimate.flops import flops_per_sample, student_tokens_per_sample
    from d2v.train.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"train.max_steps={args.warmup + args.steps * (2 if args.profile else 1)}", *args.overrides]
    if args.micro_batch:
        overrides.append(f"train.micro_batch_size={args.micro_batch}")
    if args.seconds:
        overrides.append(f"data.synthetic_seconds={args.seconds}")
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.compile:
        overrides.append("train.compile=true")
    cfg = resolve(args.preset, overrides=overrides)
    trainer = Trainer(cfg, load_template(args.ds_config))
    timer = PhaseTimer()
    timer.wrap(trainer.task, "forward", "student_fwd")
    timer.wrap(trainer.engine, "backward", "student_bwd")
    timer.wrap(trainer.engine, "step", "optimizer")
    timer.wrap(trainer.teacher, "update", "ema")
    timer.wrap(trainer.teacher, "targets", "teacher_fwd")
    timer.wrap(kernels, "accumulate", "targets")
    timer.wrap(kernels, "finalize", "targets")

    b = cfg.train.micro_batch_size
    step_times = []

    def one_step(i: int) -> None:
        with timer.phase("data"):
            micro = [synthetic_batch(cfg, b, seed=0, index=i * cfg.train.grad_accum + k)
                     for k in range(cfg.train.grad_accum)]
        trainer.train_step(micro)
        sync()

    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            timer.reset()
        t0 = time.perf_counter()
        one_step(i)
        if i >= args.warmup:
            step_times.append(time.perf_counter() - t0)
    split_totals = dict(timer.totals)
    profiler = None
    if args.profile:  # extra steps after the timed ones: the profiler's overhead stays out of the timings
        with torch.profiler.profile(activities=profile_activities()) as profiler:
            for i in range(args.steps):
                one_step(args.warmup + args.steps + i)
    step = statistics.median(step_times)
    n = args.steps
    split = {p: split_totals.get(p, 0.0) / n for p in PHASES}
    split["teacher_fwd"] -= split["targets"]  # targets are built inside the teacher's forward
    samples = b * cfg.train.grad_accum * trainer.world_size
    unit, per_sample = units_per_sample(cfg, cfg.data.synthetic_seconds)
    flops = flops_per_sample(cfg, cfg.data.synthetic_seconds).train_step * samples
    peak = args.peak_tflops or matmul_peak_tflops()
    achieved = flops / step / 1e12 / trainer.world_size
    record = {
        "preset": args.preset, "ds_config": os.path.basename(args.ds_config), "precision": cfg.train.precision,
        "world_size": trainer.world_size, "zero_stage": trainer.zero_stage, "micro_batch": b,
        "grad_accum": cfg.train.grad_accum, "sample_seconds": cfg.data.synthetic_seconds if unit == "frames" else None,
        "steps": n, "step_time_s": step, "step_time_min_s": min(step_times), "samples_per_s": samples / step,
        f"{unit}_per_s": samples * per_sample / step, "unit": unit,
        # what the student's blocks encode: all positions (1.0), M clones' kept tokens (+CLS) in 2.0
        "student_tokens_per_s": samples * student_tokens_per_sample(cfg, per_sample) / step,
        "split_s": split, "flops_per_step": flops, "tflops_per_rank": achieved, "peak_tflops": peak,
        "peak_measured": args.peak_tflops is None, "mfu": achieved / peak,
        "peak_memory_bytes": peak_memory_bytes(), "machine": machine(),
        "teacher_offload": cfg.teacher.offload, "overrides": args.overrides, "compile": cfg.train.compile,
    }
    if profiler is not None:
        record["profile_top_ops"] = top_ops(profiler, n, args.profile)
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--ds_config", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        "ds_configs", "cpu.json"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="audio: seconds per synthetic utterance")
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks (train.compile=true)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the timed steps with torch.profiler and report the N ops with the most self time")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak to compute MFU against (default: measured)")
    ap.add_argument("--out-dir", default=None, help="where the JSON record goes (default benchmarks/results)")
    ap.add_argument("--local_rank", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    record = run(args)
    from d2v.train import distributed

    if distributed.init_distributed()[0] == 0:
        path = write_record("throughput", record, args.out_dir)
        unit = record["unit"]
        print(table([record], [("preset", "preset", "{}"), ("precision", "prec", "{}"), ("world_size", "ranks", "{}"),
                               ("zero_stage", "ZeRO", "{}"), ("micro_batch", "batch", "{}"),
                               ("step_time_s", "step s", "{:.3f}"), ("samples_per_s", "samples/s", "{:.2f}"),
                               (f"{unit}_per_s", f"{unit}/s", "{:.0f}"),
                               ("student_tokens_per_s", "student tokens/s", "{:.0f}"),
                               ("tflops_per_rank", "TFLOP/s", "{:.3f}"),
                               ("mfu", "MFU", "{:.1%}"), ("peak_memory_bytes", "peak mem B", "{:.3g}")]))
        print(table([{k: v * 1e3 for k, v in record["split_s"].items()}],
                    [(p, f"{p} ms", "{:.1f}") for p in PHASES]))
        if "profile_top_ops" in record:
            print(table(record["profile_top_ops"], [("op", "op", "{}"), ("self_ms_per_step", "self ms/step", "{:.1f}"),
                                                    ("share", "share", "{:.1%}"),
                                                    ("calls_per_step", "calls/step", "{:.0f}")]))
        print(f"record: {path}")
    distributed.shutdown()
    return record


if __name__ == "__main__":
    main()
