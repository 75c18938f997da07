"""Word and character error rates from a plain Levenshtein distance (no external scorer).

WER = (substitutions + deletions + insertions) / reference words, summed over the corpus
before dividing (the usual corpus-level rate, as sclite and fairseq report it); CER the same
over characters, spaces included.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Minimum number of substitutions, deletions and insertions turning `ref` into `hyp`."""
    prev = list(range(len(hyp) + 1))  # distances from the empty reference prefix
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1,              # delete r
                         cur[j - 1] + 1,           # insert h
                         prev[j - 1] + (r != h))   # substitute (or match)
        prev = cur
    return prev[-1]


class ErrorCounts(NamedTuple):
    errors: int
    """Edits summed over utterances."""
    total: int
    """Reference units (words or characters) summed over utterances."""

    @property
    def rate(self) -> float:
        return self.errors / self.total


def _counts(refs: Sequence[str], hyps: Sequence[str], split) -> ErrorCounts:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses; they must pair up")
    errors = total = 0
    for i, (ref, hyp) in enumerate(zip(refs, hyps)):
        r = split(ref)
        if not r:
            # An empty reference makes the rate undefined (any output is an infinite error rate).
            raise ValueError(f"reference {i} is empty; drop utterances without a transcript before scoring")
        errors += edit_distance(r, split(hyp))
        total += len(r)
    return ErrorCounts(errors, total)


def word_errors(refs: Sequence[str], hyps: Sequence[str]) -> ErrorCounts:
    return _counts(refs, hyps, str.split)


def char_errors(refs: Sequence[str], hyps: Sequence[str]) -> ErrorCounts:
    # Runs of whitespace count as one space so that CER does not depend on formatting.
    return _counts(refs, hyps, lambda s: list(" ".join(s.split())))


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    return word_errors(refs, hyps).rate


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    return char_errors(refs, hyps).rate
