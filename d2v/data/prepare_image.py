"""`python -m d2v.data.prepare image SRC OUT`: an ImageNet-style tree (one folder per class of
JPEG/PNG files) into WebDataset shards with the labels kept.

Each sample holds the original encoded bytes (`jpg` or `png`; re-encoded as PNG when the source is
another format), the class index (`cls`) and the relative path (`json`). Class indices follow the
sorted folder names and are written to `classes.json`; `lengths.json` lists every shard's keys.
Keys come from the relative paths (dots and slashes become `_`); paths that read alike that way
(`c/a.b.png`, `c/a_b.png`, `c_a/b.png`) get numbered keys in path order, so every file is one
sample. Unreadable images are skipped and listed in `report.json`. A fraction of each class (or
a list of class-balanced files) is held out as validation shards.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
from typing import Any

from d2v.data.shard_writer import ShardWriter, check_output, claim_output, naming_full_disk, unique_keys, write_sidecar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def scan_tree(src: str) -> tuple[list[str], list[tuple[str, int]]]:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source folder {src} does not exist")
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise ValueError(f"{src} has no class folders (expected SRC/<class>/<image>)")
    files = []
    for idx, name in enumerate(classes):
        for root, _, names in os.walk(os.path.join(src, name)):
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((os.path.join(root, n), idx))
    if not files:
        raise ValueError(f"{src} holds no images with extensions {IMAGE_EXTENSIONS}")
    return classes, files


def _encoded(path: str) -> tuple[str, bytes]:
    """Verifies the file decodes; returns (extension, bytes), re-encoding exotic formats to PNG."""
    from PIL import Image

    with open(path, "rb") as f:
        raw = f.read()
    with Image.open(io.BytesIO(raw)) as im:
        im.load()  # forces a full decode: truncated files fail here, not during training
        fmt = (im.format or "").upper()
        if fmt in ("JPEG", "PNG"):
            return ("jpg" if fmt == "JPEG" else "png"), raw
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return "png", buf.getvalue()


def prepare_image(src: str, out: str, *, samples_per_shard: int = 1000, val_fraction: float = 0.1,
                  seed: int = 0, clean: bool = False) -> dict[str, Any]:
    check_output(out)
    classes, files = scan_tree(src)
    # Keys over the whole sorted tree, before the split: unique across train and valid, and the
    # same for the same tree whatever the seed.
    rels = sorted(os.path.relpath(path, src) for path, _ in files)
    keys = dict(zip(rels, unique_keys(rels)))
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {}
    for path, idx in files:
        by_class.setdefault(idx, []).append(path)
    split = {"train": [], "valid": []}
    for idx, paths in sorted(by_class.items()):
        paths = sorted(paths)
        rng.shuffle(paths)
        n_val = int(round(len(paths) * val_fraction)) if len(paths) > 1 else 0
        split["valid"] += [(p, idx) for p in paths[:n_val]]
        split["train"] += [(p, idx) for p in paths[n_val:]]
    claim_output(out, clean=clean)
    skipped, counts, patterns, writers = [], {}, {}, []
    for name, items in split.items():
        rng.shuffle(items)
        if not items:
            continue
        writer = ShardWriter(out, name, max_count=samples_per_shard)
        for path, idx in items:
            rel = os.path.relpath(path, src)
            try:
                ext, data = _encoded(path)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
                skipped.append({"path": rel, "reason": f"{type(e).__name__}: {e}"})
                continue
            meta = json.dumps({"path": rel, "class": classes[idx]}, sort_keys=True).encode()
            writer.write(keys[rel], {ext: data, "cls": str(idx).encode(), "json": meta}, 1)
        writer.close()
        writers.append(writer)
        counts[name] = sum(len(v) for v in writer.shards.values())
        patterns[name] = writer.pattern()
    write_sidecar(out, writers)
    with open(os.path.join(out, "classes.json"), "w") as f:
        json.dump(classes, f, indent=1)
    report = {"source": os.path.abspath(src), "classes": len(classes), "samples": counts, "patterns": patterns,
              "skipped": skipped}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m d2v.data.prepare image", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clean", action="store_true", help="delete an earlier prepare's shards in OUT first")
    args = ap.parse_args(argv)
    with naming_full_disk(args.out):
        report = prepare_image(args.src, args.out, samples_per_shard=args.samples_per_shard,
                               val_fraction=args.val_fraction, seed=args.seed, clean=args.clean)
    print(f"{report['samples']} images in {report['classes']} classes; skipped {len(report['skipped'])} "
          f"(see {os.path.join(args.out, 'report.json')})")
    for name, pattern in report["patterns"].items():
        print(f"{name}: {pattern}")
    return report
