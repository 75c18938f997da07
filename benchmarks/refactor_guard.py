"""Numerics guard for behaviour-preserving refactors: record, then compare.

    python benchmarks/refactor_guard.py record --out before.json   # on the commit before the change
    python benchmarks/refactor_guard.py record --out after.json    # on the change, same machine
    python benchmarks/refactor_guard.py compare before.json after.json

`record` runs every tiny preset (1.0 and 2.0, three modalities) for a few fp32 updates with fixed
seeds and dropout/LayerDrop as the preset sets them, once with ZeRO 0 and once with ZeRO 3, in one
process, and keeps each step's loss and a digest of the final teacher weights; it also reads the
first batches of each tiny preset's loader over the demo shards (`--data DIR`, holding
`audio/`, `image/`, `text/` as `python -m d2v.data.demo <modality> DIR/<modality>` writes them) and
keeps a digest of every batch. `compare` prints
every entry that differs (losses as exact float hex, and by how much). Results hold for one machine
only: another CPU's GEMM kernels give other bits.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

PRESETS = ["audio_tiny", "image_tiny", "text_tiny", "audio_tiny_v2", "image_tiny_v2", "text_tiny_v2"]


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def record_training(steps: int) -> dict:
    import torch

    from d2v.config import load_template, resolve
    from d2v.data.synthetic import synthetic_batch
    from d2v.train.trainer import Trainer

    torch.set_num_threads(1)  # one thread: GEMM reduction order does not depend on the core count
    out = {}
    for preset in PRESETS:
        for stage in (0, 3):
            cfg = resolve(preset, overrides=["train.precision=fp32", f"train.max_steps={steps}", "train.grad_accum=2",
                                             "train.micro_batch_size=2", "train.threads=1"])
            template = load_template(os.path.join(ROOT, "ds_configs", "cpu.json"))
            template["zero_optimization"] = {"stage": stage}
            trainer = Trainer(cfg, template)
            losses = []
            for step in range(steps):
                batch = synthetic_batch(cfg, 4, seed=11, index=step)
                losses.append(trainer.train_step([batch.rows(0, 2), batch.rows(2, 4)]).loss)
            state = trainer.teacher.export_state()
            out[f"{preset}/zero{stage}"] = {"losses": [float(x).hex() for x in losses],
                                            "teacher": _digest(state[k] for k in sorted(state))}
            print(f"{preset} zero{stage}: " + " ".join(f"{x:.6f}" for x in losses), flush=True)
    return out


def record_loaders(data: str, batches: int) -> dict:
    from d2v.config import resolve
    from d2v.train.shard_streams import shard_stream_factories

    out = {}
    for preset in ["audio_tiny", "image_tiny", "text_tiny", "audio_tiny_v2", "image_tiny_v2", "text_tiny_v2"]:
        modality = preset.split("_")[0]
        patterns = json.load(open(os.path.join(data, modality, "patterns.json")))
        cfg = resolve(preset, overrides=[f"data.train_shards={patterns['train']}", "data.num_workers=0"])
        stream = shard_stream_factories(cfg)[0](0, 1)
        digests = []
        for _ in range(batches):
            b = stream.next_batch()
            digests.append(_digest([v for v in vars(b).values() if hasattr(v, "shape")]))
        out[f"{preset}/loader"] = {"batches": digests}
        print(f"{preset} loader: {len(digests)} batches", flush=True)
    return out


def compare(a: dict, b: dict) -> int:
    bad = 0
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            print(f"{key}: only in {'after' if key not in a else 'before'}")
            bad += 1
            continue
        if a[key] == b[key]:
            print(f"{key}: identical")
            continue
        bad += 1
        if "losses" in a[key]:
            la = [float.fromhex(x) for x in a[key]["losses"]]
            lb = [float.fromhex(x) for x in b[key]["losses"]]
            first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), None)
            worst = max(abs(x - y) for x, y in zip(la, lb))
            print(f"{key}: losses differ from step {first}, max |diff| {worst:.3g}; "
                  f"teacher {'same' if a[key]['teacher'] == b[key]['teacher'] else 'differs'}")
        else:
            print(f"{key}: differs")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--out", required=True)
    rec.add_argument("--steps", type=int, default=4)
    rec.add_argument("--data", help="folder with image/ and text/ demo shards (patterns.json in each)")
    rec.add_argument("--batches", type=int, default=6)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = ap.parse_args()
    if args.cmd == "compare":
        bad = compare(json.load(open(args.before)), json.load(open(args.after)))
        print(f"{bad} entries differ")
        return 1 if bad else 0
    result = record_training(args.steps)
    if args.data:
        result.update(record_loaders(args.data, args.batches))
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
