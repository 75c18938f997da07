#!/usr/bin/env python
"""GPU acceptance: one command that says whether d2v is right and fast on this machine.

  python benchmarks/gpu_check.py                      # on a GPU machine (`make gpu-check`)
  TRITON_INTERPRET=1 DS_ACCELERATOR=cpu python benchmarks/gpu_check.py --device cpu --quick

Checks, each one or more rows of one table (name | result | value | limit | pass):
* kernels: every attention candidate (kernels.attention.RUNNERS) and the Triton target kernels
  against the float64 (attention) / fp32 (targets) references in bf16, fp16 and fp32, forward
  and every gradient (q, k, v, tensor bias, ALiBi scale), with key padding, a fully padded
  sample, T % 128 == 64 and odd lengths. A candidate the dispatcher would not pick for a call
  (kernels.attention.candidates) is "n/a" with the reason, never run and never failed;
* runs: each tiny preset (1.0 and 2.0) and audio_base / image_base through the real run loop
  (d2v.train.launch.build_run, synthetic streams) for a few updates: samples/s, positions/s,
  achieved TFLOP/s and MFU (d2v/estimate/flops.py: teacher and feature encoder counted) against
  --peak-tflops or the device's bf16 dense datasheet peak, peak device memory; and the
  host-device synchronisations of every update against d2v.train.sync_budget.budget;
* two ranks: with >= 2 GPUs `deepspeed --num_gpus 2` at ZeRO 2 and 3 over NCCL; with one GPU
  two ranks on that GPU over a CUDA-only gloo group ("cuda:gloo") at ZeRO 0 (NCCL refuses two
  ranks on one device); on a CPU two gloo ranks;
* teacher: the offloaded teacher's targets equal the resident teacher's (bitwise), and the
  ZeRO-3 teacher's bytes per rank equal the counted number (`python -m d2v describe`).

Writes benchmarks/results/gpu_check-all-<stamp>.json (machine, versions, every row and its
details). Exit status 1 when any row fails, 0 otherwise ("n/a" rows do not fail).
On a CPU (`--device cpu`, or no CUDA) it runs as a smoke test of itself: the Triton rows run
under the interpreter when TRITON_INTERPRET=1 was set before start (fp32 attention, every dtype
for the targets; the interpreter's bf16 tl.dot is wrong), else they are n/a.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

# d2v from this checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT

import torch  # noqa: E402

from benchmarks.common import machine, matmul_peak_tflops, peak_memory_bytes, sync, table, write_record  # noqa: E402
from benchmarks.gpu_check_kernels import DTYPES, check_attention, check_targets  # noqa: E402
from d2v.train.distributed import _free_port  # noqa: E402

TINY = ("audio_tiny", "image_tiny", "text_tiny", "audio_tiny_v2", "image_tiny_v2", "text_tiny_v2")
BASE = ("audio_base", "image_base")




# -- the table ---------------------------------------------------------------------------------
class Report:
    """Rows of the one table; a row's `ok` is True (pass), False (FAIL) or None (n/a)."""

    def __init__(self, budget_s: float) -> None:
        self.rows: list[dict[str, Any]] = []
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.seconds: dict[str, float] = {}  # wall time per section, by its first row

    def add(self, name: str, result: str, value: Any, limit: Any, ok: bool | None, **detail: Any) -> None:
        row = {"name": name, "result": result, "value": value, "limit": limit,
               "pass": "n/a" if ok is None else ("pass" if ok else "FAIL")}
        if detail:
            row["detail"] = detail
        self.rows.append(row)
        print(f"  {row['pass']:>4}  {name}: {result}", flush=True)

    def na(self, name: str, reason: str) -> None:
        self.add(name, f"n/a: {reason}", None, None, None)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def section(self, names: list[str], fn: Callable[[], None]) -> None:
        """Runs fn (which adds rows named from `names`); rows it could not add fail with why."""
        before = {r["name"] for r in self.rows}
        t0 = time.monotonic()
        if self.left_s() <= 0:
            for n in names:
                self.add(n, f"not run: the {self.budget_s:.0f} s budget was spent", None, None, False)
            return
        try:
            fn()
        except Exception as e:  # one broken check must not hide the others
            err = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            traceback.print_exc()
            for n in names:
                if n not in {r["name"] for r in self.rows} - before:
                    self.add(n, f"error: {err}", None, None, False)
        self.seconds[names[0]] = time.monotonic() - t0

    @property
    def failed(self) -> list[str]:
        return [r["name"] for r in self.rows if r["pass"] == "FAIL"]


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# -- training runs -----------------------------------------------------------------------------
def peak_tflops(args) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if torch.cuda.is_available() and args.device == "cuda":
        from d2v.train.throughput_log import datasheet_peak

        name = torch.cuda.get_device_name()
        value = datasheet_peak(name)  # the run log's table: one list of datasheet peaks
        if value is not None:
            return value, f"{name} bf16 dense datasheet"
    return matmul_peak_tflops(n=512 if args.quick else 2048), "measured bf16 matmul"


def _ds_template(device: torch.device) -> dict[str, Any]:
    from d2v.config import load_template

    name = "zero2.json" if device.type == "cuda" else "cpu.json"
    return load_template(os.path.join(ROOT, "ds_configs", name))


def _step_batches(run) -> list:
    return [run.stream.next_batch() for _ in range(run.cfg.train.grad_accum)]


def run_preset(preset: str, args, device: torch.device, out_dir: str, template: dict[str, Any],
               peak: tuple[float, str]) -> dict[str, Any]:
    """Warm-up, timed updates through Trainer.train_step, then counted updates through Run.train."""
    from benchmarks.throughput import units_per_sample
    from d2v.config import resolve
    from d2v.estimate.flops import flops_per_sample
    from d2v.train.launch import build_run
    from d2v.train.sync_budget import budget, count_run_syncs

    warmup, steps, counted = (1, 2, 3) if args.quick else (2, 5, 3)
    overrides = [f"train.max_steps={warmup + steps + counted + 1}", "train.log_every=2", "train.save_every=0",
                 "train.val_every=0", f"train.out_dir={os.path.join(out_dir, preset)}", *args.overrides]
    if args.micro_batch:
        overrides.append(f"train.micro_batch_size={args.micro_batch}")
    cfg = resolve(preset, overrides=overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = build_run(cfg, template, console=False)
    try:
        trainer = run.trainer
        losses, skipped = [], 0
        for _ in range(warmup):
            m = trainer.train_step(_step_batches(run))
            losses.append(float(m.loss))
            skipped += bool(m.values.get("skipped"))
        times = []
        for _ in range(steps):
            batches = _step_batches(run)
            sync()
            t0 = time.perf_counter()
            m = trainer.train_step(batches)
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(float(m.loss))
            skipped += bool(m.values.get("skipped"))
        step_s = sorted(times)[len(times) // 2]
        groups = len(trainer.engine.optimizer.param_groups)
        counts, _ = count_run_syncs(run, counted, device_view=device.type != "cuda")
        zero, precision = trainer.zero_stage, cfg.train.precision
        sync_steps = [{"step": s.step, "log_step": s.log_step, "count": s.count,
                       "budget": budget(zero, precision, log_step=s.log_step, param_groups=groups),
                       "kinds": s.kinds} for s in counts]
        samples = cfg.train.micro_batch_size * cfg.train.grad_accum * trainer.world_size
        unit, per_sample = units_per_sample(cfg, cfg.data.synthetic_seconds)
        flops = flops_per_sample(cfg, cfg.data.synthetic_seconds).train_step * samples
        achieved = flops / step_s / 1e12 / trainer.world_size
        return {"preset": preset, "zero_stage": zero, "precision": precision, "micro_batch": cfg.train.micro_batch_size,
                "grad_accum": cfg.train.grad_accum, "world_size": trainer.world_size, "step_s": step_s,
                "samples_per_s": samples / step_s, "unit": unit, f"{unit}_per_s": samples * per_sample / step_s,
                "tflops": achieved, "peak_tflops": peak[0], "peak_source": peak[1], "mfu": achieved / peak[0],
                "peak_memory_bytes": peak_memory_bytes(), "losses": losses, "skipped": skipped, "param_groups": groups,
                "syncs": sync_steps, "backend": _backend_name()}
    finally:
        run.close()
        del run
        _release()


def _release() -> None:
    """Frees what a finished check held on the device before the next one measures its peak."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _backend_name() -> str:
    from d2v import collectives

    return collectives.backend()


def check_runs(report: Report, args, device: torch.device, out_dir: str) -> None:
    template = _ds_template(device)
    peak = peak_tflops(args)
    for preset in TINY + BASE:
        names = [f"run/{preset}", f"syncs/{preset}"]
        if preset not in args.presets:
            for n in names:
                report.na(n, "not selected (--presets)")
            continue

        def one(preset=preset, names=names):
            r = run_preset(preset, args, device, out_dir, copy.deepcopy(template), peak)
            finite = all(math.isfinite(x) for x in r["losses"]) and not r["skipped"]
            unit = r["unit"]
            report.add(names[0], f"{r['samples_per_s']:.1f} samples/s, {r[f'{unit}_per_s']:.3g} {unit}/s, "
                                 f"{r['tflops']:.3g} TFLOP/s, peak mem {r['peak_memory_bytes'] / 2**30:.2f} GiB, "
                                 f"ZeRO {r['zero_stage']} {r['precision']} over {r['backend']}; loss "
                                 f"{'finite' if finite else 'NOT finite'}",
                       r["mfu"], f"MFU vs {r['peak_tflops']:.3g} TFLOP/s ({r['peak_source']})", finite, **r)
            plain = [s for s in r["syncs"] if not s["log_step"]]
            logs = [s for s in r["syncs"] if s["log_step"]]
            over = [s for s in r["syncs"] if s["count"] > s["budget"]]
            worst = max(plain or r["syncs"], key=lambda s: s["count"])
            log_txt = f", log steps {max(s['count'] for s in logs)} (budget {logs[0]['budget']})" if logs else ""
            report.add(names[1], f"per update {worst['count']}{log_txt}"
                                 + (f"; over budget at steps {[s['step'] for s in over]}" if over else ""),
                       worst["count"], worst["budget"], not over, steps=r["syncs"])

        report.section(names, one)


# -- two ranks ---------------------------------------------------------------------------------
def launch_two_ranks(zero: int, backend: str | None, args, out: str, timeout_s: float) -> list[dict[str, Any]]:
    """Two ranks of benchmarks/gpu_check_ranks.py: through the deepspeed launcher on >= 2 GPUs,
    else as two processes with the launcher's environment (the launcher refuses more ranks than GPUs)."""
    os.makedirs(out, exist_ok=True)
    script = os.path.join(ROOT, "benchmarks", "gpu_check_ranks.py")
    port = _free_port()
    rank_args = ["--preset", args.rank_preset, "--zero", str(zero), "--out", out,
                 "--steps", "2" if args.quick else "4"]
    if backend:
        rank_args += ["--backend", backend]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if backend is None and torch.cuda.is_available() and args.device == "cuda":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
               script, *rank_args]
        procs = [subprocess.Popen(cmd, env=env, cwd=ROOT)]
    else:
        procs = []
        for r in range(2):
            e = dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, script, *rank_args], env=e, cwd=ROOT))
    deadline = time.monotonic() + timeout_s
    try:
        # A rank that fails exits non-zero while its peer may wait in a collective forever:
        # stop the rest soon after the first failure.
        failed_at = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now - failed_at > 15):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r in range(2):
        path = os.path.join(out, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
        else:
            results.append({"rank": r, "error": f"no result (exit codes {[p.returncode for p in procs]}"
                                                + (f", stopped after {timeout_s:.0f} s" if time.monotonic() > deadline
                                                   else "") + ")"})
    return results


# What a CUDA-only gloo group cannot do (an op or dtype gloo has no CUDA path for): the
# one-GPU stand-in is then infeasible on this build, which the row says instead of failing.
GLOO_INFEASIBLE = ("not supported", "unsupported", "no backend type", "invalid backend", "not implemented")


def _two_rank_row(report: Report, name: str, results: list[dict[str, Any]], what: str,
                  backend: str | None = None) -> None:
    errors = [f"rank {r['rank']}: {r['error']}" for r in results if "error" in r]
    if errors:
        if backend == "cuda:gloo" and any(k in e.lower() for e in errors for k in GLOO_INFEASIBLE):
            report.add(name, f"n/a: infeasible on this build ({what}): {errors[0]}", None, None, None, ranks=results)
        else:
            report.add(name, f"{what}: {'; '.join(errors)}", None, None, False, ranks=results)
        return
    finite = all(math.isfinite(x) for r in results for x in r["losses"])
    over = [(r["rank"], s["step"]) for r in results for s in r["syncs"] if s["count"] > s["budget"]]
    r0 = results[0]
    detail = f"{what}: {r0['steps']} updates, {r0['samples_per_s']:.1f} samples/s (both ranks), loss " \
             f"{'finite' if finite else 'NOT finite'}, syncs per update {max(s['count'] for s in r0['syncs'])}"
    ok = finite and not over
    if over:
        detail += f"; over the sync budget at (rank, step) {over}"
    if "teacher_bytes" in r0:
        tb = [r["teacher_bytes"] for r in results]
        counted = r0["teacher_bytes_counted"]
        slack = 0.01 * counted + 4096
        fit = all(abs(b - counted) <= slack for b in tb)
        ok = ok and fit
        detail += f"; ZeRO-3 teacher bytes/rank {tb} vs counted {counted}{'' if fit else ' (MISMATCH)'}"
    report.add(name, detail, r0["samples_per_s"], "finite loss, syncs within budget", ok, ranks=results)


def check_two_ranks(report: Report, args, device: torch.device, out_dir: str) -> None:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    timeout = 300.0 if device.type == "cuda" else 240.0
    for zero in (2, 3):
        name = f"two_ranks/nccl_zero{zero}"
        if gpus < 2:
            report.na(name, f"{gpus} GPU(s): needs 2; see two_ranks/gloo_zero0")
            continue

        def nccl(zero=zero, name=name):
            res = launch_two_ranks(zero, None, args, os.path.join(out_dir, f"nccl_zero{zero}"),
                                   min(timeout, max(30.0, report.left_s())))
            _two_rank_row(report, name, res, f"deepspeed --num_gpus 2, NCCL, ZeRO {zero}")

        report.section([name], nccl)
    name = "two_ranks/gloo_zero0"
    if gpus >= 2:
        report.na(name, "the NCCL rows cover two ranks on this machine")
        return
    # The CPU smoke run takes the same --backend path as the one-GPU stand-in (the CPU suite runs it).
    backend = "cuda:gloo" if device.type == "cuda" else "gloo"
    what = ("two ranks on one GPU over a CUDA-only gloo group (cuda:gloo), ZeRO 0" if device.type == "cuda" else
            "two CPU ranks over a gloo group made by --backend gloo, ZeRO 0")

    def gloo():
        res = launch_two_ranks(0, backend, args, os.path.join(out_dir, "gloo_zero0"),
                               min(timeout, max(30.0, report.left_s())))
        _two_rank_row(report, name, res, what, backend)

    report.section([name], gloo)


# -- teacher -----------------------------------------------------------------------------------
def check_offload(report: Report, args, device: torch.device) -> None:
    from d2v.config import resolve
    from d2v.models import build_model
    from d2v.teacher import Teacher

    preset = "audio_tiny" if args.quick else "audio_base"
    cfg = resolve(preset)
    torch.manual_seed(args.seed)
    student = build_model(cfg)  # on the host, as Trainer builds it: the offloaded copy stays there
    resident = Teacher(student, cfg.teacher).place(device)
    off_cfg = copy.deepcopy(cfg.teacher)
    off_cfg.offload = "cpu"
    offloaded = Teacher(student, off_cfg).place(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    B, T = (2, 49) if args.quick else (4, 499)
    if cfg.teacher.input == "source":
        x = torch.randn(B, int(T * 320), generator=gen, device=device)
        pad = None
    else:  # the teacher reads the student's features
        x = torch.randn(B, T, cfg.model.embed_dim, generator=gen, device=device)
        pad = torch.zeros(B, T, dtype=torch.bool, device=device)
        pad[1, T // 2:] = True
    results = {}
    for dname in ("fp32", "bf16"):
        dtype = DTYPES[dname]
        want = resident.targets(x, pad, compute_dtype=dtype)
        got = offloaded.targets(x, pad, compute_dtype=dtype)
        results[dname] = float((got - want).abs().max())
    worst = max(results.values())
    report.add("teacher/offload_equals_resident",
               f"{preset}, max abs(offloaded - resident) fp32 {results['fp32']:.3g}, bf16 {results['bf16']:.3g}",
               worst, 0.0, worst <= 0.0 * args.tolerance_scale and math.isfinite(worst), **results)


def teacher_tensor_bytes(trainer) -> int:
    """Bytes of the tensors the teacher holds on this rank (deduplicated by storage)."""
    teacher = trainer.teacher
    if teacher.zero3 is not None:
        tensors = [t for p in teacher.model.parameters() for t in (p.data, p.ds_tensor)] + list(teacher.zero3.shards)
    else:
        tensors = list(teacher.model.parameters())
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0 or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def counted_teacher_bytes(preset: str, overrides: list[str], world_size: int) -> int:
    from d2v.estimate.describe import describe

    mem = describe(preset, overrides, world_size=world_size, zero=3)["memory_per_rank"]
    return int(mem["teacher_device"] + mem["teacher_host"])


def check_zero3_teacher(report: Report, args, device: torch.device, out_dir: str) -> None:
    from d2v.config import load_template, resolve
    from d2v.train.trainer import Trainer

    preset = "audio_tiny" if args.quick else "audio_base"
    overrides = ["train.max_steps=3", f"train.out_dir={os.path.join(out_dir, 'zero3')}"]
    cfg = resolve(preset, overrides=overrides)
    trainer = Trainer(cfg, load_template(os.path.join(ROOT, "ds_configs", "zero3.json")))
    try:
        # Persistent parameters stay gathered from the second update on (the first one records
        # ZeRO-3's fetch trace).
        for batches in _stream_batches(cfg, trainer, 2):
            trainer.train_step(batches)
        measured = teacher_tensor_bytes(trainer)
        ws = trainer.world_size
    finally:
        del trainer
        _release()
    counted = counted_teacher_bytes(preset, overrides, ws)
    slack = 0.01 * counted + 4096  # DeepSpeed aligns flat buffers to a few elements
    report.add("teacher/zero3_bytes_per_rank", f"{preset}, {ws} rank(s): measured {measured:,} B, "
                                                f"counted (python -m d2v describe) {counted:,} B",
               measured, counted, abs(measured - counted) <= slack)


def _stream_batches(cfg, trainer, steps: int) -> list[list]:
    from d2v.train.streams import SyntheticStream

    s = SyntheticStream(cfg, rank=trainer.rank, world_size=trainer.world_size)
    return [[s.next_batch() for _ in range(cfg.train.grad_accum)] for _ in range(steps)]


# -- main --------------------------------------------------------------------------------------
# The two-rank rows first: they run in their own processes (nothing of this one's state), and an
# overrun of the in-process sections' budget cannot starve the only rows that cross ranks. Runs
# before the teacher checks: the ZeRO-3 engine of the latter is the last one built here.
ALL_SECTIONS = ("two_ranks", "kernels", "runs", "teacher")


def row_names(args, device: torch.device) -> dict[str, list[str]]:
    import importlib

    dispatch = importlib.import_module("d2v.kernels.attention")
    kernels_rows = [f"attention/{n}/{d}" for n in dispatch.RUNNERS for d in args.dtypes]
    kernels_rows += [f"targets/triton/{d}" for d in args.dtypes]
    return {"kernels": kernels_rows,
            "runs": [f"{k}/{p}" for p in TINY + BASE for k in ("run", "syncs")],
            "teacher": ["teacher/offload_equals_resident", "teacher/zero3_bytes_per_rank"],
            "two_ranks": ["two_ranks/nccl_zero2", "two_ranks/nccl_zero3", "two_ranks/gloo_zero0"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when available (a CPU run is a smoke test of this script)")
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer steps (the CPU smoke test)")
    ap.add_argument("--presets", default=",".join(TINY + BASE), help="comma list of the presets to run")
    ap.add_argument("--sections", default=",".join(ALL_SECTIONS), help=f"comma list of {ALL_SECTIONS}")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="checks not started within this many seconds fail as not run")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak to compute MFU against (default: the device's bf16 dense datasheet figure)")
    ap.add_argument("--micro-batch", type=int, default=None, help="override every preset's micro-batch")
    ap.add_argument("--rank-preset", default="audio_tiny", help="preset of the two-rank runs")
    ap.add_argument("--tolerance-scale", type=float, default=1.0,
                    help="multiplies every numeric limit (0 forces failures: a check of the check)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None, help="where the JSON record goes (default benchmarks/results)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for the preset runs")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda but torch {torch.__version__} sees no CUDA device; use --device cpu for the smoke test")
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    args.presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(args.presets) - set(TINY + BASE))
    if unknown:
        ap.error(f"--presets {unknown}: choose from {TINY + BASE}")
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if not set(args.dtypes) <= set(DTYPES):
        ap.error(f"--dtypes {args.dtypes}: choose from {tuple(DTYPES)}")
    sections = [s for s in args.sections.split(",") if s]
    if not set(sections) <= set(ALL_SECTIONS):
        ap.error(f"--sections {sections}: choose from {ALL_SECTIONS}")

    from d2v.train import distributed

    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    report = Report(args.budget_s)
    names = row_names(args, device)
    print(f"gpu_check on {machine()['device']} ({args.device}{', quick' if args.quick else ''}), "
          f"budget {args.budget_s:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for s in ALL_SECTIONS:
            if s not in sections:
                for n in names[s]:
                    report.na(n, "section not selected (--sections)")
                continue
            if s == "kernels":
                report.section([n for n in names[s] if n.startswith("attention/")],
                               lambda: check_attention(report, args, device))
                report.section([n for n in names[s] if n.startswith("targets/")],
                               lambda: check_targets(report, args, device))
            elif s == "teacher":
                report.section(names[s][:1], lambda: check_offload(report, args, device))
                report.section(names[s][1:], lambda: check_zero3_teacher(report, args, device, tmp))
            elif s == "runs":
                check_runs(report, args, device, tmp)
            else:
                check_two_ranks(report, args, device, tmp)
    wall = time.monotonic() - report.start
    record = {"kind": "gpu_check", "machine": machine(), "mode": {"device": args.device, "quick": args.quick,
              "budget_s": args.budget_s, "tolerance_scale": args.tolerance_scale, "sections": sections,
              "presets": args.presets, "dtypes": args.dtypes},
              "wall_s": wall, "section_s": report.seconds, "passed": not report.failed, "failed": report.failed, "rows": report.rows}
    path = write_record("gpu_check", record, args.out_dir)
    print(table([{k: fmt(r[k]).replace("|", "/") for k in ("name", "result", "value", "limit", "pass")}
                 for r in report.rows],
                [("name", "name", "{}"), ("result", "result", "{}"), ("value", "value", "{}"),
                 ("limit", "limit", "{}"), ("pass", "pass", "{}")]))
    print(f"{len(report.rows)} rows, {len(report.failed)} failed, {wall:.0f} s; record: {path}")
    distributed.shutdown()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
