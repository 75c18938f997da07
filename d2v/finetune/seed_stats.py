"""Mean, spread and a significance check for results repeated over seeds (`make eval`).

A single seed of a demo-scale run is noise: the pretrained and the random-init arm are each run
over several seeds, summarised by their mean and sample standard deviation, and their difference
is called beyond the spread only when Welch's t-test (unequal variances) rejects equal means at
`alpha`. With one run in an arm there is no spread to compare against, and nothing is claimed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ArmSummary:
    values: tuple[float, ...]
    mean: float
    std: float
    """Sample standard deviation (n - 1); NaN for a single value."""

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Comparison:
    pretrained: ArmSummary
    random_init: ArmSummary
    difference: float
    """Mean of the pretrained arm minus mean of the random-init arm."""
    p_value: float
    """Welch's two-sided p-value; NaN when an arm has fewer than two runs or no spread at all."""
    beyond_spread: bool


def summarize(values: Sequence[float]) -> ArmSummary:
    vals = tuple(float(v) for v in values)
    if not vals:
        raise ValueError("no results to summarise: every run of this arm failed or none was asked for")
    mean = math.fsum(vals) / len(vals)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan
    return ArmSummary(vals, mean, std)


def compare(pretrained: Sequence[float], random_init: Sequence[float], *, alpha: float = 0.05) -> Comparison:
    a, b = summarize(pretrained), summarize(random_init)
    p = math.nan
    if a.n > 1 and b.n > 1 and (a.std > 0 or b.std > 0):
        from scipy.stats import ttest_ind

        p = float(ttest_ind(a.values, b.values, equal_var=False).pvalue)
    elif a.n > 1 and b.n > 1 and a.mean != b.mean:
        p = 0.0  # both arms repeat exactly: any difference is not noise
    return Comparison(a, b, a.mean - b.mean, p, bool(p == p and p < alpha))


def describe(c: Comparison, *, percent: bool = True) -> tuple[str, str, str, str]:
    """Table cells: pretrained, random init, difference, verdict."""
    def cell(s: ArmSummary) -> str:
        scale = 100.0 if percent else 1.0
        unit = "%" if percent else ""
        if s.n == 1:
            return f"{s.mean * scale:.1f}{unit} (1 run)"
        return f"{s.mean * scale:.1f} ± {s.std * scale:.1f}{unit} (n={s.n})"

    scale = 100.0 if percent else 1.0
    diff = f"{c.difference * scale:+.1f}{' points' if percent else ''}"
    if c.p_value != c.p_value:
        verdict = "no spread to compare: run more seeds"
    else:
        verdict = f"{'beyond' if c.beyond_spread else 'within'} the spread (Welch p={c.p_value:.3f})"
    return cell(c.pretrained), cell(c.random_init), diff, verdict
