"""`python -m d2v.data.demo audio OUT [--utterances N]`: built-in demo speech, offline.

Synthesizes English sentences taken from the Python documentation every CPython ships
(`pydoc_data.topics`) with eSpeak NG (GPL-3.0-or-later, loaded from the optional
`espeakng-loader` wheel; see `d2v.data.espeak`) in several voices, pitches and rates, at
22,050 Hz. Writes them as a LibriSpeech-style tree (speaker = voice/pitch/rate, one chapter,
`*.flac` + `*.trans.txt`) under OUT/raw, then runs the same prepare path as real corpora into
OUT/shards (resampled to 16 kHz). The voice `en-gb-scotland` is held out as the validation split
(for evaluation and the later CTC fine-tuning on unseen voices). Deterministic given --seed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from typing import Sequence

import numpy as np
import soundfile

from d2v.data.prepare_audio import prepare_audio, print_summary

VOICES = ("en", "en-us", "en-029", "en-us-nyc", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-scotland")
HELD_OUT_VOICE = "en-gb-scotland"
PITCHES = (30, 45, 60, 75)
RATES = (135, 160, 185)
MIN_SECONDS, MAX_SECONDS = 1.0, 6.0


def sentences() -> list[str]:
    """Sentences of 4-14 words from pydoc_data.topics, cleaned to letters and simple punctuation.

    Sentences that lose more than a tenth of their characters in cleaning (code, symbols) are left out.
    """
    from pydoc_data.topics import topics

    out: set[str] = set()
    for text in topics.values():
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            clean = " ".join(re.sub(r"[^A-Za-z ,;'.?!]", " ", sentence).split())
            if (len(clean) >= 0.9 * len(sentence) and re.fullmatch(r"[A-Z][A-Za-z ,;']+[.?!]", clean)
                    and 4 <= len(clean.split()) <= 14):
                out.add(clean)
    return sorted(out)


def _speaker(voice: str, pitch: int, rate: int) -> str:
    return f"{voice.replace('-', '')}p{pitch}r{rate}"


def save_utterance(raw: str, texts: dict[str, list[str]], speaker: str, wav: np.ndarray, sample_rate: int,
                   transcript: str) -> None:
    """One utterance in the LibriSpeech layout (speaker/1/speaker-1-NNNN.flac); its transcript line is
    kept in `texts` until `write_transcripts`."""
    folder = os.path.join(raw, speaker, "1")
    os.makedirs(folder, exist_ok=True)
    lines = texts.setdefault(speaker, [])
    utt = f"{speaker}-1-{len(lines):04d}"
    soundfile.write(os.path.join(folder, f"{utt}.flac"), wav, sample_rate, subtype="PCM_16")
    lines.append(f"{utt} {transcript}")


def write_transcripts(raw: str, texts: dict[str, list[str]]) -> None:
    for speaker, lines in texts.items():
        with open(os.path.join(raw, speaker, "1", f"{speaker}-1.trans.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def make_audio_demo(out: str, *, utterances: int = 300, seed: int = 0, workers: int = 1) -> dict:
    """Synthesizes the tree and prepares shards; returns the prepare totals."""
    from d2v.data.espeak import Espeak

    engine = Espeak()
    rng = np.random.default_rng(seed)
    pool = sentences()
    order = rng.permutation(len(pool))
    raw = os.path.join(out, "raw")
    texts: dict[str, list[str]] = {}
    made, cursor = 0, 0
    while made < utterances:
        if cursor >= 20 * len(order):
            raise RuntimeError(f"could not synthesize {utterances} utterances of {MIN_SECONDS}-{MAX_SECONDS} s")
        # Past the end, sentences come round again in other voices, pitches and rates.
        sentence = pool[order[cursor % len(order)]]
        cursor += 1
        voice = VOICES[made % len(VOICES)]  # round robin, so even tiny demos hold out a voice
        pitch, rate = int(rng.choice(PITCHES)), int(rng.choice(RATES))
        wav = engine.synthesize(sentence, voice=voice, rate=rate, pitch=pitch)
        if not MIN_SECONDS <= len(wav) / engine.sample_rate <= MAX_SECONDS:
            continue
        save_utterance(raw, texts, _speaker(voice, pitch, rate), wav, engine.sample_rate,
                       re.sub(r'[^A-Z ]', '', sentence.upper()))
        made += 1
    write_transcripts(raw, texts)
    held_out = [s for s in texts if s.startswith(HELD_OUT_VOICE.replace("-", ""))]
    report = prepare_audio(raw, os.path.join(out, "shards"), clean=True, samples_per_shard=max(8, utterances // 12),
                           val_speakers=held_out, workers=workers)
    print_summary(report)
    return report["totals"]


def write_patterns(out: str, train: str, valid: str | None) -> str:
    """OUT/patterns.json: the shard patterns to pass to the launcher (used by `make demo`)."""
    import json

    path = os.path.join(out, "patterns.json")
    with open(path, "w") as f:
        json.dump({"train": train, "valid": valid}, f, indent=1)
    return path


# Modalities whose demo data has its own module (audio's is below).
OTHER_DEMOS = {"image": "d2v.data.demo_image", "text": "d2v.data.demo_text"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OTHER_DEMOS:
        result = importlib.import_module(OTHER_DEMOS[argv[0]]).main(argv[1:])
        write_patterns(argv[1], result["patterns"]["train"], result["patterns"].get("valid"))
        return 0
    parser = argparse.ArgumentParser(prog="python -m d2v.data.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modality", choices=["audio"], help="image and text: see d2v.data.demo_image, demo_text")
    parser.add_argument("out")
    parser.add_argument("--utterances", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    totals = make_audio_demo(args.out, utterances=args.utterances, seed=args.seed, workers=args.workers)
    write_patterns(args.out, totals["train"]["pattern"], (totals.get("val") or {}).get("pattern"))
    print(f"demo audio: {args.utterances} utterances in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
