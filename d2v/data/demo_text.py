"""Built-in text demo corpus, no download: text every Python installation
ships — the documentation topics in `pydoc_data` and the docstrings of the standard library's
modules (read from source with `ast`, nothing imported). Paragraphs become documents.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import sysconfig


def pydoc_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for text in topics.values():
        out += [p for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 8]
    return out


def stdlib_docstrings(limit_files: int = 400) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    files = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".py"))[:limit_files]
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out += [p for p in re.split(r"\n\s*\n", doc) if len(p.split()) >= 8]
    return out


def write_corpus(path: str) -> int:
    paragraphs = pydoc_paragraphs() + stdlib_docstrings()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in paragraphs:
            f.write(" ".join(p.split()) + "\n\n")
    return len(paragraphs)


def build_text_demo(out: str, *, vocab_size: int = 2000, block_size: int = 128, seed: int = 0) -> dict:
    from d2v.data.prepare_text import prepare_text

    corpus = os.path.join(out, "corpus", "python_docs.txt")
    write_corpus(corpus)
    return prepare_text(corpus, os.path.join(out, "shards"), clean=True, vocab_size=vocab_size, block_size=block_size,
                        samples_per_shard=500, seed=seed)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m d2v.data.demo text", description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=128)
    args = ap.parse_args(argv)
    meta = build_text_demo(args.out, vocab_size=args.vocab_size, block_size=args.block_size)
    for name, pattern in meta["patterns"].items():
        print(f"{name}: {pattern} ({meta['blocks'][name]} blocks)")
    return meta
