"""`python -m d2v.data.demo_glue OUT`: a small sentence-pair task in GLUE's RTE layout, offline
(README, fine-tuning).

Pairs built from the docstring sentences of d2v.data.demo_text_cls, half of each label: the
hypothesis (sentence2) is a run of at least half the words of the premise (`entailment`), or a run
of another sentence about the same package family (`not_entailment`, so that the topic alone does
not tell). Written as
OUT/RTE/train.tsv and OUT/RTE/dev.tsv with RTE's header and columns (index, sentence1, sentence2,
label), so that `--recipe glue_rte --train-data OUT/RTE --eval-data OUT/RTE` runs it. The dev
pairs use sentences no training pair uses.
"""
from __future__ import annotations

import argparse
import os
import random

from d2v.data.demo_text_cls import TOPICS, package_sentences

ENTAILED, NOT_ENTAILED = "entailment", "not_entailment"


def _run_of_words(sentence: str, rng: random.Random) -> str:
    words = sentence.split()
    k = rng.randint(max(len(words) // 2, 1), len(words))
    start = rng.randint(0, len(words) - k)
    return " ".join(words[start:start + k])


def _pairs(pools: dict[str, list[str]], n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    topics = sorted(pools)
    rows = []
    for i in range(n):
        premise, other = rng.sample(pools[rng.choice(topics)], 2)
        source, label = (premise, ENTAILED) if i % 2 == 0 else (other, NOT_ENTAILED)
        rows.append((premise, _run_of_words(source, rng), label))
    rng.shuffle(rows)
    return rows


def build_glue_demo(out: str, *, train_pairs: int = 2000, dev_pairs: int = 400, per_topic: int = 200,
                    seed: int = 0) -> dict:
    """Sentences of at most 20 words (short pairs fit the tiny models' 128 positions), a quarter of
    each topic's held out for the dev pairs."""
    rng = random.Random(seed)
    pools: dict[str, dict[str, list[str]]] = {"train": {}, "dev": {}}
    for topic, packages in TOPICS.items():
        sentences = package_sentences(packages, max_words=20)
        rng.shuffle(sentences)
        sentences = sentences[:per_topic]
        n_dev = max(len(sentences) // 4, 2)
        if len(sentences) - n_dev < 2:
            raise RuntimeError(f"only {len(sentences)} docstring sentences for {topic} ({packages}) in this Python")
        pools["dev"][topic], pools["train"][topic] = sentences[:n_dev], sentences[n_dev:]
    folder = os.path.join(out, "RTE")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for split, n in (("train", train_pairs), ("dev", dev_pairs)):
        paths[split] = os.path.join(folder, f"{split}.tsv")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.write("index\tsentence1\tsentence2\tlabel\n")
            f.writelines(f"{i}\t{a}\t{b}\t{label}\n" for i, (a, b, label) in enumerate(_pairs(pools[split], n, rng)))
    return {"folder": folder, "paths": paths, "train": train_pairs, "dev": dev_pairs,
            "sentences": sorted({s for p in pools.values() for pool in p.values() for s in pool})}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m d2v.data.demo_glue", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--train-pairs", type=int, default=2000)
    ap.add_argument("--dev-pairs", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    info = build_glue_demo(args.out, train_pairs=args.train_pairs, dev_pairs=args.dev_pairs, seed=args.seed)
    print(f"{info['train']} train / {info['dev']} dev pairs in RTE's layout: {info['folder']}")
    return info


if __name__ == "__main__":
    main()
