"""`python -m d2v.data.demo_asr OUT`: a labelled speech-recognition demo, offline (README, fine-tuning).

eSpeak NG speech (see `d2v.data.demo`, `d2v.data.espeak`) of sentences from CPython's own
documentation, with known transcripts. Two voices are held out for evaluation and never spoken
in the training split, and the evaluation sentences are disjoint from the training sentences, so
the score measures recognition of unseen speakers saying unseen sentences. Written as a
LibriSpeech-style tree (OUT/raw) and prepared into 16 kHz shards with transcripts (OUT/shards:
train-* from the training voices, val-* from the held-out ones); OUT/patterns.json names them.
The language model for beam-search decoding, OUT/lm.arpa (a 4-gram, as the paper's), is built
from the training sentences' pool (OUT/lm_text.txt), never from an evaluation sentence, as
LibriSpeech's LM corpus leaves out its dev and test books.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from typing import Sequence

import numpy as np

from d2v.data.demo import (MAX_SECONDS, MIN_SECONDS, PITCHES, RATES, VOICES, _speaker, save_utterance, sentences,
                           write_patterns, write_transcripts)

HELD_OUT_VOICES = ("en-gb-scotland", "en-gb-x-gbcwmd")
MAX_ASR_SECONDS = 4.5  # shorter utterances keep CPU fine-tuning to minutes


def transcript(sentence: str) -> str:
    """Upper-case letters, apostrophes and single spaces (the CTC alphabet)."""
    return " ".join(re.sub(r"[^A-Z' ]", " ", sentence.upper()).split())


def sentence_pools(rng: np.random.Generator) -> dict[str, list[str]]:
    """The sentences of each split (a fifth for evaluation), dealt before any is spoken so that no
    sentence is in both; the first draw of the demo's generator."""
    pool = [s for s in sentences() if transcript(s)]
    order = rng.permutation(len(pool)).tolist()
    n_eval_pool = len(order) // 5
    return {"val": [pool[i] for i in order[:n_eval_pool]], "train": [pool[i] for i in order[n_eval_pool:]]}


def demo_lm(out: str, seed: int = 0) -> str:
    """OUT/lm.arpa of a demo made with `seed`, built when missing (demos made before it existed)."""
    path = os.path.join(out, "lm.arpa")
    if not os.path.exists(path):
        write_demo_lm(out, [transcript(s) for s in sentence_pools(np.random.default_rng(seed))["train"]])
    return path


def make_asr_demo(out: str, *, train_utterances: int = 480, eval_utterances: int = 96, seed: int = 0,
                  held_out: Sequence[str] = HELD_OUT_VOICES, workers: int = 1) -> dict:
    from d2v.data.espeak import Espeak
    from d2v.data.prepare_audio import prepare_audio

    unknown = sorted(set(held_out) - set(VOICES))
    if unknown or len(set(held_out)) >= len(VOICES):
        raise ValueError(f"held-out voices {list(held_out)} must be a proper subset of {list(VOICES)}")
    engine = Espeak()
    rng = np.random.default_rng(seed)
    pools = sentence_pools(rng)
    voices = {"val": list(held_out), "train": [v for v in VOICES if v not in held_out]}
    wanted = {"train": train_utterances, "val": eval_utterances}
    raw = os.path.join(out, "raw")
    texts: dict[str, list[str]] = {}
    for split in ("train", "val"):
        made = cursor = 0
        while made < wanted[split]:
            if cursor >= 6 * len(pools[split]):
                raise RuntimeError(f"ran out of sentences for {wanted[split]} {split} utterances of "
                                   f"{MIN_SECONDS}-{MAX_ASR_SECONDS} s")
            # Past the end of its pool a split's sentences come round again in other voices.
            sentence = pools[split][cursor % len(pools[split])]
            cursor += 1
            voice = voices[split][made % len(voices[split])]
            pitch, rate = int(rng.choice(PITCHES)), int(rng.choice(RATES))
            wav = engine.synthesize(sentence, voice=voice, rate=rate, pitch=pitch)
            if not MIN_SECONDS <= len(wav) / engine.sample_rate <= min(MAX_SECONDS, MAX_ASR_SECONDS):
                continue
            save_utterance(raw, texts, _speaker(voice, pitch, rate), wav, engine.sample_rate, transcript(sentence))
            made += 1
    write_transcripts(raw, texts)
    write_demo_lm(out, [transcript(s) for s in pools["train"]])
    prefixes = tuple(v.replace("-", "") + "p" for v in held_out)
    val_speakers = [s for s in texts if s.startswith(prefixes)]
    report = prepare_audio(raw, os.path.join(out, "shards"), clean=True, samples_per_shard=64,
                           val_speakers=val_speakers, workers=workers)
    totals = report["totals"]
    write_patterns(out, totals["train"]["pattern"], totals["val"]["pattern"])
    return totals


LM_ORDER = 4


def write_demo_lm(out: str, lines: list[str]) -> str:
    """OUT/lm_text.txt and OUT/lm.arpa built from it; returns the ARPA path."""
    from d2v.data.arpa import build_arpa_file

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lm_text.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    path = os.path.join(out, "lm.arpa")
    build_arpa_file(lines, path, LM_ORDER)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m d2v.data.demo_asr", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--train-utterances", type=int, default=480)
    ap.add_argument("--eval-utterances", type=int, default=96)
    ap.add_argument("--held-out", default=",".join(HELD_OUT_VOICES), help="comma-separated eSpeak voices")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    totals = make_asr_demo(args.out, train_utterances=args.train_utterances, eval_utterances=args.eval_utterances,
                           seed=args.seed, held_out=[v for v in args.held_out.split(",") if v], workers=args.workers)
    for split, t in totals.items():
        print(f"{split}: {t['samples']} utterances, {t['hours'] * 60:.1f} min: {t['pattern']}")
    print(f"ASR demo in {time.perf_counter() - start:.1f} s")
    return totals


if __name__ == "__main__":
    main()
