"""What each base and large preset trains at cluster sizes, and whether it fits the device:
`python -m d2v plan` (d2v.plan.plan_run, the launcher's own steps) for every preset x world size x
ZeRO stage, without data or engines. Prints one Markdown table and writes a JSON record.

    python benchmarks/plan_sweep.py [--world-sizes 8,64,512] [--zero 2,3] [--device-memory-gb 80]

Memory per rank counts the model states (weights, gradients, optimizer state, teacher), not the
activations: `python -m d2v describe --world-size N --zero S` says how they are estimated.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, table, write_record  # noqa: E402


def _presets() -> list[str]:
    from d2v.config import list_presets

    return [p for p in list_presets() if "_base" in p or "_large" in p]


def sweep(world_sizes: list[int], stages: list[int], device_memory_gb: float) -> list[dict]:
    from d2v.plan import plan_run

    rows = []
    for preset in _presets():
        for n in world_sizes:
            row: dict = {"preset": preset, "world_size": n}
            for stage in stages:
                info = plan_run(preset, n, zero=stage, device_memory_gb=device_memory_gb)
                row[f"memory_zero{stage}_gb"] = info["memory_per_rank_gb"]
                row[f"fits_zero{stage}"] = info["fits_device"]
            unit = info["global_batch"]["unit"]
            ref = info["reference_global_batch"]
            row.update(global_batch=f"{info['global_batch']['value']:,} {unit}",
                       reference=f"{ref['value']:,}" if ref else "none",
                       matches=info["matches_reference"],
                       micro_x_accum=f"{info['micro_batch']['value']:,} x {info['grad_accum']}",
                       message=info["message"])
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", default="8,64,512")
    ap.add_argument("--zero", default="2,3")
    ap.add_argument("--device-memory-gb", type=float, default=80.0)
    args = ap.parse_args(argv)
    world_sizes = [int(n) for n in args.world_sizes.split(",")]
    stages = [int(s) for s in args.zero.split(",")]
    rows = sweep(world_sizes, stages, args.device_memory_gb)
    columns = [("preset", "preset", "{}"), ("world_size", "N", "{}"), ("global_batch", "global batch", "{}"),
               ("reference", "reference", "{}"), ("matches", "=ref", "{}"), ("micro_x_accum", "micro x accum", "{}")]
    for s in stages:
        columns.append((f"memory_zero{s}_gb", f"ZeRO-{s} GB/rank", "{:.1f}"))
    print(table(rows, columns))
    print(f"\nmemory: model states per rank against {args.device_memory_gb:g} GB (activations not counted)")
    path = write_record("plan_sweep", {"machine": machine(), "device_memory_gb": args.device_memory_gb,
                                       "rows": rows})
    print(f"record: {path}")


if __name__ == "__main__":
    main()
