"""`python -m d2v.data.demo_text_cls OUT`: a small labelled text-classification demo, offline
(README, fine-tuning).

Sentences from the docstrings of six standard-library packages every CPython ships, labelled by
the package family they document: asyncio, email, tkinter (gui), http + urllib (web), xml and
logging. Read from source with `ast` (nothing is imported). The text pretraining demo reads only
the top-level modules of the standard library, so these sentences are unseen in pretraining.
Written as OUT/train.tsv and OUT/test.tsv (`sentence<TAB>label`), balanced per class, with a
fixed random split. The exact sentences depend on the Python version.
"""
from __future__ import annotations

import argparse
import ast
import os
import random
import re
import sysconfig

TOPICS: dict[str, tuple[str, ...]] = {
    "asyncio": ("asyncio",),
    "email": ("email",),
    "gui": ("tkinter",),
    "web": ("http", "urllib"),
    "xml": ("xml",),
    "logging": ("logging",),
}


def package_sentences(packages: tuple[str, ...], *, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Sorted, de-duplicated docstring sentences of the packages (test folders excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    out: set[str] = set()
    for pkg in packages:
        for folder, dirs, names in os.walk(os.path.join(root, pkg)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("test"))
            for name in sorted(n for n in names if n.endswith(".py")):
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (SyntaxError, UnicodeDecodeError, OSError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node) or ""
                        for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                            if min_words <= len(s.split()) <= max_words and re.search(r"[a-z]{3}", s):
                                out.add(s)
    return sorted(out)


def build_text_cls_demo(out: str, *, per_class: int = 240, test_fraction: float = 0.25, seed: int = 0) -> dict:
    rng = random.Random(seed)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    counts = {}
    for label, packages in TOPICS.items():
        pool = package_sentences(packages)
        if len(pool) < 20:
            raise RuntimeError(f"only {len(pool)} docstring sentences for {label} ({packages}) in this Python")
        rng.shuffle(pool)
        pool = pool[:per_class]
        n_test = int(round(len(pool) * test_fraction))
        rows["test"] += [(s, label) for s in pool[:n_test]]
        rows["train"] += [(s, label) for s in pool[n_test:]]
        counts[label] = len(pool)
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split, items in rows.items():
        rng.shuffle(items)
        paths[split] = os.path.join(out, f"{split}.tsv")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(f"{text}\t{label}\n" for text, label in items)
    return {"paths": paths, "per_class": counts, "train": len(rows["train"]), "test": len(rows["test"])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m d2v.data.demo_text_cls", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    info = build_text_cls_demo(args.out, per_class=args.per_class, seed=args.seed)
    print(f"{info['train']} train / {info['test']} test sentences, {len(info['per_class'])} labels: "
          f"{info['paths']['train']}, {info['paths']['test']}")
    return info


if __name__ == "__main__":
    main()
