"""GLUE's metrics from sums that ranks add up, so that a sharded evaluation gives the corpus value.

Binary tasks keep the confusion counts (MCC for CoLA; F1 of class 1 and accuracy for MRPC and QQP,
as fairseq's sentence_prediction criterion reports them with sklearn); STS-B keeps the moments of
(prediction, score) for Pearson's r. Spearman's rho is Pearson's r of the ranks (ties get their
average rank, as scipy's spearmanr), and ranks need the whole set: the caller gathers predictions.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MOMENTS = ("n", "sx", "sy", "sxx", "syy", "sxy")
CONFUSION = ("tp", "fp", "fn", "tn")


def confusion(pred: Sequence[int], gold: Sequence[int]) -> dict[str, float]:
    """Counts of a binary prediction against the gold labels, class 1 positive."""
    p, g = np.asarray(pred) == 1, np.asarray(gold) == 1
    return {"tp": float(np.sum(p & g)), "fp": float(np.sum(p & ~g)), "fn": float(np.sum(~p & g)),
            "tn": float(np.sum(~p & ~g))}


def mcc(c: dict[str, float]) -> float:
    """Matthews correlation; 0 when a row or column of the table is empty (sklearn's convention)."""
    tp, fp, fn, tn = (c[k] for k in CONFUSION)
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(denom) if denom > 0 else 0.0


def f1(c: dict[str, float]) -> float:
    """F1 of class 1; 0 when there is neither a positive prediction nor a positive label."""
    denom = 2 * c["tp"] + c["fp"] + c["fn"]
    return 2 * c["tp"] / denom if denom > 0 else 0.0


def moments(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return {"n": float(len(x)), "sx": float(x.sum()), "sy": float(y.sum()), "sxx": float(x @ x),
            "syy": float(y @ y), "sxy": float(x @ y)}


def pearson(m: dict[str, float]) -> float:
    """Pearson's r from the moments; nan when either side is constant (as scipy)."""
    n = m["n"]
    cov = n * m["sxy"] - m["sx"] * m["sy"]
    var = (n * m["sxx"] - m["sx"] ** 2) * (n * m["syy"] - m["sy"] ** 2)
    return cov / math.sqrt(var) if var > 0 else float("nan")


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; equal values share the mean of the ranks they span."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    ranks = np.empty(len(v))
    start = 0
    while start < len(v):
        end = start
        while end + 1 < len(v) and sorted_v[end + 1] == sorted_v[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(moments(average_ranks(x), average_ranks(y)))
