"""CTC prefix beam search with a word n-gram LM and a lexicon (Hannun et al. 2014; the decoder of
fairseq's and flashlight's `kenlm` recipes, with their settings).

A hypothesis is a collapsed label sequence. Per frame it keeps two log probabilities, of the
alignments ending in a blank (`pb`) and in its last label (`pnb`), so that its acoustic score is the
exact sum over every alignment of the frames so far (not one path). Words are spelled letter by
letter: a letter must continue a lexicon word, and the word boundary `|` (or the end of the
utterance) completes one, which then adds `lm_weight · log10 p_LM(word | previous words) +
word_score`; the end adds `lm_weight · log10 p_LM(</s> | ...)`. Hypotheses are ranked by acoustic
(natural log, as the model's log-softmax) plus LM score, `beam` kept per frame, those more than
`beam_threshold` below the best dropped. Without an LM (lm=None) it is a plain prefix search over
the labels (no lexicon, no word score).

Legend: T frames, V labels (blank first, then `|`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from d2v.data.arpa import BOS, EOS, ArpaModel
from d2v.finetune.config import DecodeConfig

NEG = -math.inf


def _logaddexp(a: float, b: float) -> float:
    if a == NEG:
        return b
    if b == NEG:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


class Lexicon:
    """The words the decoder may spell, as a set of their prefixes (a trie flattened into sets)."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = frozenset(w for w in words if w and w not in (BOS, EOS, "<unk>"))
        if not self.words:
            raise ValueError("the lexicon is empty: give it the words the decoder may output")
        self.prefixes = frozenset(w[:i] for w in self.words for i in range(1, len(w) + 1))


def read_lexicon(path: str) -> Lexicon:
    """A word per line; further fields (fairseq/flashlight's letter spelling `W O R D |`) are ignored."""
    with open(path, encoding="utf-8") as f:
        words = [line.split()[0] for line in f if line.strip()]
    if not words:
        raise ValueError(f"{path}: the lexicon has no words")
    return Lexicon(words)


@dataclass
class _Hyp:
    pb: float = NEG
    pnb: float = NEG
    lm: float = 0.0
    history: tuple[str, ...] = (BOS,)
    partial: str = ""
    words: tuple[str, ...] = field(default_factory=tuple)

    @property
    def acoustic(self) -> float:
        return _logaddexp(self.pb, self.pnb)


class BeamDecoder:
    def __init__(self, symbols: Sequence[str], lm: ArpaModel | None = None, lexicon: Lexicon | None = None,
                 settings: DecodeConfig | None = None) -> None:
        settings = settings if settings is not None else DecodeConfig()
        if lm is not None and lexicon is None:
            lexicon = Lexicon(lm.vocab)
        if settings.beam < 1:
            raise ValueError(f"the beam holds at least one hypothesis, got beam={settings.beam}")
        self.symbols, self.lm, self.lexicon, self.settings = list(symbols), lm, lexicon, settings
        self.boundary = self.symbols.index("|")

    def _word_score(self, history: tuple[str, ...], word: str) -> float:
        return self.settings.lm_weight * self.lm.log10p(word, history) + self.settings.word_score

    def _extend(self, hyp: _Hyp, label: int) -> _Hyp | None:
        """The state after appending `label`, or None where the lexicon forbids it."""
        if self.lm is None:
            return _Hyp(words=hyp.words)
        if label == self.boundary:
            if not hyp.partial:
                return _Hyp(lm=hyp.lm, history=hyp.history, words=hyp.words)
            if hyp.partial not in self.lexicon.words:
                return None
            return _Hyp(lm=hyp.lm + self._word_score(hyp.history, hyp.partial), history=hyp.history + (hyp.partial,),
                        words=hyp.words + (hyp.partial,))
        partial = hyp.partial + self.symbols[label]
        if partial not in self.lexicon.prefixes:
            return None
        return _Hyp(lm=hyp.lm, history=hyp.history, partial=partial, words=hyp.words)

    def _final(self, hyp: _Hyp) -> float | None:
        """The LM score with the open word and the sentence end, or None if the open word is no word."""
        if self.lm is None:
            return hyp.lm
        lm, history = hyp.lm, hyp.history
        if hyp.partial:
            if hyp.partial not in self.lexicon.words:
                return None
            lm, history = lm + self._word_score(history, hyp.partial), history + (hyp.partial,)
        return lm + self.settings.lm_weight * self.lm.log10p(EOS, history)

    def search(self, log_probs_TV: np.ndarray) -> list[tuple[tuple[int, ...], float]]:
        """(labels, total score) of the surviving hypotheses, best first."""
        lp = np.asarray(log_probs_TV, dtype=np.float64)
        s = self.settings
        beam: dict[tuple[int, ...], _Hyp] = {(): _Hyp(pb=0.0)}
        labels = np.arange(1, lp.shape[1])
        for t in range(lp.shape[0]):
            row = lp[t]
            tried = labels if not s.beam_size_token else labels[np.argsort(-row[1:])[:s.beam_size_token]]
            nxt: dict[tuple[int, ...], _Hyp] = {}

            def slot(key: tuple[int, ...], parent: _Hyp, label: int | None) -> _Hyp | None:
                if key not in nxt:
                    state = _Hyp(lm=parent.lm, history=parent.history, partial=parent.partial, words=parent.words) \
                        if label is None else self._extend(parent, label)
                    if state is None:
                        return None
                    nxt[key] = state
                return nxt[key]

            for key, hyp in beam.items():
                total = hyp.acoustic
                stay = slot(key, hyp, None)
                stay.pb = _logaddexp(stay.pb, total + row[0])
                last = key[-1] if key else None
                for c in tried:
                    c = int(c)
                    if c == last:
                        stay.pnb = _logaddexp(stay.pnb, hyp.pnb + row[c])  # the label continues
                        grow = slot(key + (c,), hyp, c)
                        if grow is not None:  # the label again, after a blank
                            grow.pnb = _logaddexp(grow.pnb, hyp.pb + row[c])
                    else:
                        grow = slot(key + (c,), hyp, c)
                        if grow is not None:
                            grow.pnb = _logaddexp(grow.pnb, total + row[c])
            ranked = sorted(nxt.items(), key=lambda kv: kv[1].acoustic + kv[1].lm, reverse=True)
            best = ranked[0][1].acoustic + ranked[0][1].lm
            # Impossible prefixes (a repeated label with no blank between yet) score -inf: dropped.
            beam = {k: h for k, h in ranked[:s.beam] if h.acoustic + h.lm >= best - s.beam_threshold
                    and h.acoustic > NEG}
        finished = []
        for key, hyp in beam.items():
            lm = self._final(hyp)
            if lm is not None:
                finished.append((key, hyp.acoustic + lm))
        return sorted(finished, key=lambda kv: kv[1], reverse=True)

    def decode(self, log_probs_TV: np.ndarray) -> str:
        """The best hypothesis as text (empty when no hypothesis spells lexicon words only)."""
        found = self.search(log_probs_TV)
        if not found:
            return ""
        text = "".join(" " if i == self.boundary else self.symbols[i] for i in found[0][0])
        return " ".join(text.split())
