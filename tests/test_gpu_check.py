"""benchmarks/gpu_check.py (`make gpu-check`) in its CPU smoke mode, so that the GPU acceptance
command does not rot between GPU runs: every row reaches the table and the JSON record, the
kernel parity rows pass on the CPU (the Triton ones under the interpreter), the one-rank runs,
the two-rank run and the teacher checks pass, and a forced failure makes the exit status non-zero.

Rows the CPU cannot run are n/a with their reason, and the test names each one: the Triton
attention kernel in bf16 (the interpreter's tl.dot is wrong in bf16), xformers (CUDA only), the
NCCL two-rank rows (they need two GPUs) and the presets left out here for time (the same code
path as audio_tiny; the GPU run does all of them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PRESETS = ("audio_tiny", "image_tiny", "text_tiny", "audio_tiny_v2", "image_tiny_v2", "text_tiny_v2",
           "audio_base", "image_base")
RUNNERS = ("triton", "xformers", "sdpa", "reference")
DTYPES = ("bf16", "fp16", "fp32")
# In gpu_check's order: the two-rank rows first, so that no overrun of the others starves them.
ROWS = (["two_ranks/nccl_zero2", "two_ranks/nccl_zero3", "two_ranks/gloo_zero0"]
        + [f"attention/{r}/{d}" for r in RUNNERS for d in DTYPES] + [f"targets/triton/{d}" for d in DTYPES]
        + [f"{k}/{p}" for p in PRESETS for k in ("run", "syncs")]
        + ["teacher/offload_equals_resident", "teacher/zero3_bytes_per_rank"])


def gpu_check(tmp: Path, *args: str, interpret: bool) -> tuple[subprocess.CompletedProcess, dict]:
    # One thread per process: a smoke run's speed does not matter, and two threads on cores that
    # other processes share made a tiny update 7x slower.
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    # in-process tests of this session may have left a world-size-1 rendezvous (its port in use)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = tmp / "records"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out-dir", str(out), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    records = sorted(out.glob("gpu_check-all-*.json"))
    assert len(records) == 1, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc, json.loads(records[0].read_text())


def table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] != "name":
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return gpu_check(tmp_path_factory.mktemp("smoke"), "--presets", "audio_tiny", interpret=True)


def test_every_check_reaches_the_table_and_the_record(smoke):
    proc, record = smoke
    assert proc.returncode == 0, f"{record['failed']}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    names = [r["name"] for r in record["rows"]]
    assert names == ROWS
    shown = table_rows(proc.stdout)
    assert list(shown) == ROWS
    for r in record["rows"]:
        assert shown[r["name"]][4] == r["pass"], r["name"]
    m = record["machine"]
    for key in ("device", "torch", "triton", "deepspeed", "python", "commit"):
        assert m.get(key), key
    assert record["passed"] is True and record["failed"] == []


def test_smoke_rows_pass_or_say_why_not(smoke):
    _, record = smoke
    rows = {r["name"]: r for r in record["rows"]}
    expected_na = {"attention/triton/bf16": "interpreter", "two_ranks/nccl_zero2": "needs 2",
                   "two_ranks/nccl_zero3": "needs 2"}
    expected_na.update({f"attention/xformers/{d}": "" for d in DTYPES})
    expected_na.update({f"{k}/{p}": "--presets" for p in PRESETS if p != "audio_tiny" for k in ("run", "syncs")})
    for name, row in rows.items():
        if name in expected_na:
            assert row["pass"] == "n/a", name
            assert row["result"].startswith("n/a: ") and expected_na[name] in row["result"], row
        else:
            assert row["pass"] == "pass", row
    # Parity rows really compared something against a finite limit.
    for name in ("attention/triton/fp32", "attention/triton/fp16", "attention/sdpa/bf16", "targets/triton/bf16"):
        assert 0 <= rows[name]["value"] <= rows[name]["limit"] < 0.1, rows[name]
        cases = rows[name]["detail"]["cases"]
        assert cases and all(isinstance(c, dict) for c in cases.values()), cases
    assert all(c["backend"] == "triton" for c in rows["targets/triton/fp32"]["detail"]["cases"].values())
    run = rows["run/audio_tiny"]["detail"]
    assert run["samples_per_s"] > 0 and 0 < run["mfu"] and run["peak_memory_bytes"] > 0 and run["frames_per_s"] > 0
    syncs = rows["syncs/audio_tiny"]["detail"]["steps"]
    assert syncs and any(s["log_step"] for s in syncs) and any(not s["log_step"] for s in syncs)
    assert all(0 < s["count"] <= s["budget"] for s in syncs), syncs
    assert rows["teacher/zero3_bytes_per_rank"]["value"] > 0
    ranks = rows["two_ranks/gloo_zero0"]["detail"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    # the --backend path the one-GPU stand-in (cuda:gloo) takes, here with gloo on the CPU
    assert all(r["group_from"] == "--backend" and r["backend"] == "gloo" for r in ranks), ranks


def test_a_forced_failure_fails_the_command(tmp_path):
    """Limits of 0 (every comparison shows some rounding) fail the parity rows; without the
    interpreter the Triton rows say so instead of running; a spent budget fails what it skipped."""
    proc, record = gpu_check(tmp_path, "--sections", "kernels", "--dtypes", "fp32", "--tolerance-scale", "0",
                             interpret=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    rows = {r["name"]: r for r in record["rows"]}
    assert rows["attention/sdpa/fp32"]["pass"] == "FAIL" and rows["attention/reference/fp32"]["pass"] == "FAIL"
    assert rows["attention/sdpa/fp32"]["value"] > 0 == rows["attention/sdpa/fp32"]["limit"]
    assert "TRITON_INTERPRET" in rows["attention/triton/fp32"]["result"]
    assert set(record["failed"]) == {"attention/sdpa/fp32", "attention/reference/fp32"}
    assert "FAIL" in table_rows(proc.stdout)["attention/sdpa/fp32"]

    proc, record = gpu_check(tmp_path / "budget", "--sections", "teacher", "--budget-s", "0", interpret=False)
    assert proc.returncode == 1
    rows = {r["name"]: r for r in record["rows"]}
    assert rows["teacher/offload_equals_resident"]["pass"] == "FAIL"
    assert "budget" in rows["teacher/zero3_bytes_per_rank"]["result"]
