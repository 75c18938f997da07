#!/usr/bin/env python
"""Samples/s of each modality's data pipeline (decode, augment, collate with masks), per number
of loader workers, on the built-in demo data (built under --data-root when missing).

  DS_ACCELERATOR=cpu python benchmarks/data_loader.py [--modalities audio,image,text] [--workers 0,1,2]

The pipeline is the one pretraining runs (`d2v.train.shard_streams`), configured by the base
presets (224x224 crops, 512-token blocks, the audio batch budget) unless --size tiny. Each point
reads --batches batches after one warm-up batch (which includes worker start-up). Prints a table,
writes a JSON record and a PNG plot (samples/s against workers) to benchmarks/results/.
The number to compare with a training step: samples/s per worker x workers must exceed the
step's samples/s, or the GPUs wait for data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

# d2v from this checkout.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.common import ROOT, machine, table, write_record  # noqa: E402

MODALITIES = ("audio", "image", "text")


def demo_patterns(root: str, modality: str, audio_utterances: int) -> str:
    """The demo's training shard pattern, building the demo data first if it is not there."""
    from d2v.data.demo import main as build_demo

    path = os.path.join(root, modality, "patterns.json")
    if not os.path.exists(path):
        args = [modality, os.path.join(root, modality)]
        if modality == "audio":
            args += ["--utterances", str(audio_utterances), "--workers", "1"]
        print(f"building the {modality} demo data under {os.path.dirname(path)}", flush=True)
        build_demo(args)
    with open(path) as f:
        return json.load(f)["train"]


def pipeline_config(modality: str, size: str, pattern: str, workers: int, batch: int | None):
    from d2v.config import resolve

    overrides = [f"data.train_shards={pattern}", f"data.num_workers={workers}", "data.val_shards="]
    if batch:
        overrides.append(f"train.micro_batch_size={batch}")
    if modality == "text":
        # The demo's own SentencePiece vocabulary, whatever the preset's.
        from d2v.data.text import load_tokenizer_meta

        meta = load_tokenizer_meta(pattern)
        overrides += [f"model.text.{k}={meta[k]}" for k in ("vocab_size", "pad_id", "bos_id", "eos_id", "unk_id")]
    return resolve(f"{modality}_{size}", overrides=overrides)


def measure(cfg, batches: int) -> dict[str, Any]:
    from d2v.train.shard_streams import shard_stream_factories

    make_stream, _ = shard_stream_factories(cfg)
    t0 = time.perf_counter()
    stream = make_stream(0, 1)
    stream.next_batch()
    first = time.perf_counter() - t0
    samples = units = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = stream.next_batch()
        samples += b.batch_size
        if b.padding_mask is not None:
            units += int((~b.padding_mask).sum())
        else:
            units += int(b.mask.numel())
    seconds = time.perf_counter() - t0
    return {"first_batch_s": first, "batches": batches, "samples": samples, "seconds": seconds,
            "samples_per_s": samples / seconds, "units_per_s": units / seconds, "counters": stream.counters()}


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for modality in dict.fromkeys(r["modality"] for r in rows):
        pts = [r for r in rows if r["modality"] == modality]
        ax.plot([r["workers"] for r in pts], [r["samples_per_s"] for r in pts], marker="o", label=modality)
    ax.set_xlabel("loader workers (0 = in the training process)")
    ax.set_ylabel("samples/s")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modalities", default=",".join(MODALITIES))
    ap.add_argument("--workers", default="0,1,2", help="loader worker counts to measure")
    ap.add_argument("--size", choices=("base", "tiny"), default="base", help="which presets configure the pipeline")
    ap.add_argument("--batches", type=int, default=20, help="batches timed per point (after one warm-up batch)")
    ap.add_argument("--micro-batch", type=int, default=None, help="image/text batch size (default: the preset's)")
    ap.add_argument("--data-root", default=os.path.join(ROOT, "demo_data"),
                    help="holds MODALITY/patterns.json (make demo-data); the demo data is built there if missing")
    ap.add_argument("--audio-utterances", type=int, default=120, help="size of the speech demo if it is built here")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    modalities = [m for m in args.modalities.split(",") if m]
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise SystemExit(f"unknown modalities {unknown}; choose from {MODALITIES}")
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    for modality in modalities:
        pattern = demo_patterns(args.data_root, modality, args.audio_utterances)
        for w in workers:
            cfg = pipeline_config(modality, args.size, pattern, w, args.micro_batch)
            row = {"modality": modality, "preset": cfg.name, "workers": w, **measure(cfg, args.batches)}
            row["samples_per_s_per_worker"] = row["samples_per_s"] / max(w, 1)
            row["unit"] = {"audio": "frames", "image": "patches", "text": "tokens"}[modality]
            rows.append(row)
            print(f"{modality} workers={w}: {row['samples_per_s']:.1f} samples/s", flush=True)
    record = {"kind": "data_loader", "preset": f"{args.size}", "rows": rows, "machine": machine(),
              "note": "units are non-padded model positions (frames, patches, tokens)"}
    path = write_record("data_loader", record, args.out_dir)
    png = os.path.join(os.path.dirname(path), f"data_loader-{args.size}.png")
    plot(rows, png)
    print(table(rows, [("modality", "modality", "{}"), ("preset", "preset", "{}"), ("workers", "workers", "{}"),
                       ("samples_per_s", "samples/s", "{:.1f}"),
                       ("samples_per_s_per_worker", "samples/s per worker", "{:.1f}"),
                       ("first_batch_s", "first batch s", "{:.2f}")]))
    print(f"record: {path}\nplot: {png}")
    return record


if __name__ == "__main__":
    main()
