#!/usr/bin/env python
"""d2v against what a user would build instead, side by side in one run at equal precision.

For each modality, interleaved A/B: `benchmarks/hf_baseline.py` (a naive data2vec step on
transformers' Data2Vec models: deep-copied teacher with FFN hooks, AdamW, fp32 EMA, bf16
autocast; and its student forward+backward alone) and `benchmarks/throughput.py` on the base
preset with the same batch (2) and input size (4 s of audio, 224x224 images, 512 tokens) in
DeepSpeed's bf16 mode. Reports both ratios: d2v full step / naive step and d2v full step /
transformers student alone. Needs `pip install transformers` (the `hf` extra).

  python benchmarks/compare_hf.py [--modalities audio,vision,text] [--rounds 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

# d2v from this checkout.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.common import ROOT, machine, table, write_record  # noqa: E402

PRESETS = {"audio": ("audio_base", ["--seconds", "4"]), "vision": ("image_base", []), "text": ("text_base", [])}
HF_BASELINE = os.path.join(ROOT, "benchmarks", "hf_baseline.py")


def hf_step(modality: str, threads: int, reps: int) -> dict:
    """The naive transformers step in its own process (threads and memory apart from d2v's run)."""
    done = subprocess.run([sys.executable, HF_BASELINE, modality, "--json", "--reps", str(reps), "--threads",
                           str(threads)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks/hf_baseline.py {modality} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def d2v_step(modality: str, threads: int, reps: int) -> dict:
    preset, extra = PRESETS[modality]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--preset", preset,
                        "--micro-batch", "2", "--threads", str(threads), "--steps", str(reps), "--warmup", "2",
                        "--precision", "bf16", "--out-dir", out, *extra], capture_output=True, text=True, check=True,
                       env=env, cwd=ROOT)
        name = next(n for n in os.listdir(out) if n.endswith(".json"))
        with open(os.path.join(out, name)) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modalities", default="audio,vision,text")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved A/B rounds per modality")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise SystemExit("compare_hf.py needs transformers (the `hf` extra: pip install -e .[hf])")
    rows = []
    for modality in args.modalities.split(","):
        naive, student, ours, split = [], [], [], None
        for _ in range(args.rounds):
            h = hf_step(modality, args.threads, args.reps)
            d = d2v_step(modality, args.threads, args.reps)
            naive.append(h["naive_d2v_step_s"])
            student.append(h["student_fwd_bwd_s"])
            ours.append(d["step_time_s"])
            split = d["split_s"]
        row = {"modality": modality, "preset": PRESETS[modality][0], "naive_step_s": statistics.median(naive),
               "hf_student_s": statistics.median(student), "d2v_step_s": statistics.median(ours)}
        row["d2v_over_naive"] = row["d2v_step_s"] / row["naive_step_s"]
        row["d2v_over_hf_student"] = row["d2v_step_s"] / row["hf_student_s"]
        row["d2v_split_s"] = split
        rows.append(row)
        print(f"{modality}: naive {naive} student {student} d2v {ours}", flush=True)
    record = {"kind": "compare_hf", "rows": rows, "rounds": args.rounds, "threads": args.threads,
              "precision": "bf16", "batch": 2, "machine": machine()}
    path = write_record("compare_hf", record, args.out_dir)
    print(table(rows, [("modality", "modality", "{}"), ("naive_step_s", "naive transformers step s", "{:.3f}"),
                       ("hf_student_s", "transformers student fwd+bwd s", "{:.3f}"),
                       ("d2v_step_s", "d2v full step s", "{:.3f}"), ("d2v_over_naive", "d2v / naive", "{:.2f}"),
                       ("d2v_over_hf_student", "d2v / student alone", "{:.2f}")]))
    print(f"record: {path}")
    return record


if __name__ == "__main__":
    main()
