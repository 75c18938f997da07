"""Labelled text for classification (README, fine-tuning): a TSV file of `text<TAB>label` lines,
UTF-8, no header. Blank lines are ignored; every other line must have exactly one tab, a
non-empty text and a non-empty label. Labels are indexed in sorted order, or by the training
file's list when `labels` is given (an evaluation file with an unseen label is an error).
"""
from __future__ import annotations

import os
from typing import Sequence


def read_tsv(path: str, labels: Sequence[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """(texts, label indices, label names)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labelled text file {path} does not exist")
    texts, names = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected `text<TAB>label`, found {len(parts) - 1} tabs")
            text, label = parts[0].strip(), parts[1].strip()
            if not text or not label:
                raise ValueError(f"{path}:{n}: empty {'text' if not text else 'label'}")
            texts.append(text)
            names.append(label)
    if not texts:
        raise ValueError(f"{path} holds no labelled lines")
    vocab = list(labels) if labels is not None else sorted(set(names))
    index = {name: i for i, name in enumerate(vocab)}
    unseen = sorted(set(names) - set(index))
    if unseen:
        raise ValueError(f"{path}: labels {unseen} are not among the training labels {vocab}")
    return texts, [index[name] for name in names], vocab
