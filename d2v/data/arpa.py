"""Back-off n-gram language models in the ARPA text format: reading, scoring, and building a small
one from transcripts (interpolated Kneser-Ney), so that beam-search decoding needs no download.

  python -m d2v.data.arpa OUT.arpa --text corpus.txt [--shards 'train-{000000..000007}.tar'] --order 4

Scores are log10 probabilities, as in the ARPA file and as KenLM returns them: the decoding
settings (LM weight, word score) of fairseq's and flashlight's recipes then carry over unchanged.

Back-off (Katz form, what every ARPA reader does): p(w | h) is the listed value of the n-gram
`h w` if there is one, else bow(h) · p(w | h minus its oldest word), with bow(h) = 1 when `h` is
not listed. Words outside the unigram list score as `<unk>` (an error when the model has none).
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
NEVER = -99.0
"""log10 probability the ARPA convention gives `<s>` (it is never predicted)."""


class ArpaModel:
    """An n-gram model: `entries[n][ngram] = (log10 p, log10 back-off)` for n = 1..order."""

    def __init__(self, entries: dict[int, dict[tuple[str, ...], tuple[float, float]]]) -> None:
        if not entries or sorted(entries) != list(range(1, max(entries) + 1)):
            raise ValueError(f"an n-gram model needs every order from 1 up, got orders {sorted(entries)}")
        self.entries = entries
        self.order = max(entries)
        self.vocab = frozenset(w for (w,) in entries[1])
        self._cache: dict[tuple[tuple[str, ...], str], float] = {}

    def word(self, w: str) -> str:
        """The unigram `w` is scored as (itself, or `<unk>`)."""
        if w in self.vocab:
            return w
        if UNK not in self.vocab:
            raise ValueError(f"word {w!r} is not in the language model and the model has no {UNK}")
        return UNK

    def log10p(self, w: str, context: Sequence[str] = ()) -> float:
        """log10 p(w | context), the context oldest word first (only its last order-1 words count)."""
        ctx = tuple(self.word(c) for c in context[len(context) - (self.order - 1):]) if self.order > 1 else ()
        key = (ctx, self.word(w))
        if key not in self._cache:
            self._cache[key] = self._backoff(*key)
        return self._cache[key]

    def _backoff(self, ctx: tuple[str, ...], w: str) -> float:
        penalty = 0.0
        while True:
            hit = self.entries[len(ctx) + 1].get(ctx + (w,))
            if hit is not None:
                return penalty + hit[0]
            if not ctx:
                raise ValueError(f"word {w!r} has no unigram entry")
            listed = self.entries[len(ctx)].get(ctx)
            penalty += listed[1] if listed is not None else 0.0
            ctx = ctx[1:]

    def sentence_log10p(self, words: Sequence[str]) -> float:
        """log10 p(words </s> | <s>)."""
        history, total = [BOS], 0.0
        for w in list(words) + [EOS]:
            total += self.log10p(w, history)
            history.append(w)
        return total


_COUNT = re.compile(r"ngram\s+(\d+)\s*=\s*(\d+)")


def read_arpa(path: str) -> ArpaModel:
    """Parses an ARPA file; a malformed one is a ValueError naming the file, the line and what is wrong."""
    declared: dict[int, int] = {}
    entries: dict[int, dict[tuple[str, ...], tuple[float, float]]] = {}
    section: int | None = None
    seen_data = ended = False
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            where = f"{path}, line {lineno}"
            if not line or ended:
                continue
            if line == "\\data\\":
                seen_data = True
                continue
            if line == "\\end\\":
                ended = True
                continue
            m = re.fullmatch(r"\\(\d+)-grams:", line)
            if m:
                section = int(m.group(1))
                if section not in declared:
                    raise ValueError(f"{where}: section {line} is not declared in the \\data\\ header")
                entries[section] = {}
                continue
            if section is None:
                c = _COUNT.fullmatch(line)
                if seen_data and c:
                    declared[int(c.group(1))] = int(c.group(2))
                    continue
                raise ValueError(f"{where}: expected the \\data\\ header and `ngram N=COUNT` lines, got {line[:60]!r}")
            parts = line.split()
            if len(parts) not in (section + 1, section + 2):
                raise ValueError(f"{where}: a {section}-gram line is `log10p w1 .. w{section} [backoff]`, "
                                 f"got {len(parts)} fields")
            try:
                logp = float(parts[0])
                bow = float(parts[section + 1]) if len(parts) == section + 2 else 0.0
            except ValueError:
                raise ValueError(f"{where}: {line[:60]!r} does not start with a number") from None
            entries[section][tuple(parts[1:section + 1])] = (logp, bow)
    if not seen_data or not declared:
        raise ValueError(f"{path}: not an ARPA file (no \\data\\ header with ngram counts)")
    for n, count in declared.items():
        if len(entries.get(n, {})) != count:
            raise ValueError(f"{path}: the header declares {count} {n}-grams but the file lists "
                             f"{len(entries.get(n, {}))}; the file is truncated or edited")
    return ArpaModel(entries)


def write_arpa(model: ArpaModel, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\\data\\\n")
        for n in range(1, model.order + 1):
            f.write(f"ngram {n}={len(model.entries[n])}\n")
        for n in range(1, model.order + 1):
            f.write(f"\n\\{n}-grams:\n")
            for gram, (logp, bow) in sorted(model.entries[n].items()):
                tail = f"\t{bow:.6f}" if n < model.order else ""
                f.write(f"{logp:.6f}\t{' '.join(gram)}{tail}\n")
        f.write("\n\\end\\\n")


def _discount(counts: Iterable[int]) -> float:
    """Ney's absolute discount n1 / (n1 + 2 n2) from the counts of counts (0.5 when undefined)."""
    hist = Counter(counts)
    n1, n2 = hist.get(1, 0), hist.get(2, 0)
    return n1 / (n1 + 2 * n2) if n1 and n2 else 0.5


def build_kneser_ney(sentences: Iterable[Sequence[str]], order: int = 3) -> ArpaModel:
    """Interpolated Kneser-Ney with one discount per order (Chen & Goodman 1998, §2.7), written as a
    back-off model. Below the highest order an n-gram counts its distinct left neighbours (its
    continuation count), except those starting with `<s>`, which have none and keep their count.
    The interpolation weight of a context is exactly its ARPA back-off weight; the unigrams are
    interpolated with the uniform distribution over the words, `</s>` and `<unk>`."""
    if order < 1:
        raise ValueError(f"an n-gram order is at least 1, got {order}")
    raw: dict[int, Counter] = {n: Counter() for n in range(1, order + 1)}
    for words in sentences:
        tokens = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for i in range(len(tokens) - n + 1):
                raw[n][tuple(tokens[i:i + n])] += 1
    if not raw[1]:
        raise ValueError("no sentences to build a language model from")
    left: dict[int, Counter] = {n: Counter() for n in range(1, order)}
    for n in range(2, order + 1):
        for gram in raw[n]:
            left[n - 1][gram[1:]] += 1
    adjusted: dict[int, dict[tuple[str, ...], int]] = {}
    for n in range(1, order + 1):
        adjusted[n] = {g: (c if n == order or g[0] == BOS else left[n][g]) for g, c in raw[n].items()}
        adjusted[n] = {g: c for g, c in adjusted[n].items() if c > 0 and g != (BOS,)}

    entries: dict[int, dict[tuple[str, ...], tuple[float, float]]] = {n: {} for n in range(1, order + 1)}
    vocab = sorted(({g[0] for g in raw[1]} | {UNK}) - {BOS})
    d1 = _discount(adjusted[1].values())
    total1 = sum(adjusted[1].values())
    floor = d1 * len(adjusted[1]) / total1 / len(vocab)
    probs: dict[int, dict[tuple[str, ...], float]] = {1: {}}
    gammas: dict[tuple[str, ...], float] = {}  # interpolation weight of each context, all orders
    for w in vocab:
        probs[1][(w,)] = max(adjusted[1].get((w,), 0) - d1, 0.0) / total1 + floor
    for n in range(2, order + 1):
        d = _discount(adjusted[n].values())
        by_context: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
        for g, c in adjusted[n].items():
            by_context[g[:-1]].append((g[-1], c))
        probs[n] = {}
        for h, followers in by_context.items():
            denom = sum(c for _, c in followers)
            gammas[h] = d * len(followers) / denom
            for w, c in followers:
                probs[n][h + (w,)] = (c - d) / denom + gammas[h] * _lower(probs, gammas, h[1:], w)
    for n in range(1, order + 1):
        for g, p in probs[n].items():
            entries[n][g] = (math.log10(p), math.log10(gammas[g]) if g in gammas else 0.0)
    entries[1][(BOS,)] = (NEVER, math.log10(gammas[(BOS,)]) if (BOS,) in gammas else 0.0)
    return ArpaModel(entries)


def _lower(probs: dict, gammas: dict, h: tuple[str, ...], w: str) -> float:
    """The interpolated probability of w after h from the orders already built."""
    if (h + (w,)) in probs[len(h) + 1]:
        return probs[len(h) + 1][h + (w,)]
    return gammas.get(h, 1.0) * _lower(probs, gammas, h[1:], w)


def build_arpa_file(transcripts: Iterable[str], path: str, order: int = 3) -> ArpaModel:
    """A Kneser-Ney model of upper-cased, whitespace-split transcripts, written to `path`."""
    model = build_kneser_ney((t.upper().split() for t in transcripts), order)
    write_arpa(model, path)
    return read_arpa(path)


def main(argv: list[str] | None = None) -> ArpaModel:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m d2v.data.arpa", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="ARPA file to write")
    ap.add_argument("--text", nargs="*", default=[], help="text files, one sentence per line")
    ap.add_argument("--shards", nargs="*", default=[], help="transcribed shard patterns (their transcripts)")
    ap.add_argument("--order", type=int, default=4)
    args = ap.parse_args(argv)
    lines: list[str] = []
    for path in args.text:
        with open(path, encoding="utf-8") as f:
            lines += [line for line in f if line.strip()]
    if args.shards:
        from d2v.data.transcribed import read_transcribed

        lines += [u.text for pattern in args.shards for u in read_transcribed(pattern)]
    if not lines:
        raise SystemExit("give the LM's text: --text FILE or --shards PATTERN")
    model = build_arpa_file(lines, args.out, args.order)
    print(f"{args.out}: {args.order}-gram Kneser-Ney model of {len(lines)} sentences, "
          + ", ".join(f"{len(model.entries[n])} {n}-grams" for n in range(1, model.order + 1)))
    return model


if __name__ == "__main__":
    main()
