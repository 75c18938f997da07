"""Shared by the benchmarks: machine description, bf16 matmul peak, JSON records."""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "threads": torch.get_num_threads()}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        try:
            with open("/proc/cpuinfo") as f:
                model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
        except OSError:
            model = platform.processor() or "cpu"
        info["device"] = model
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, reps: int = 5,
                       max_seconds: float = 0.25) -> float:
    """A large matmul's rate on this device: the practical peak that MFU is measured against.
    The size grows from 256 up to `n` only while one product stays under `max_seconds`: a CPU
    without bf16 instructions (AVX2 only) emulates bf16 at well under 1 GFLOP/s, where a single
    2048-cubed product would take half a minute."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        n = max(n, 8192)
    size, rate = 256, 0.0
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b
        sync()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
        rate = max(rate, 2 * size**3 / best / 1e12)
        if size * 2 > n or best * 8 > max_seconds:
            return rate
        size *= 2


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def write_record(kind: str, record: dict[str, Any], out_dir: str | None = None) -> str:
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{kind}-{record.get('preset', 'all')}-{stamp}-{os.getpid()}.json"
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table: columns are (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
