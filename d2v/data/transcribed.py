"""Transcribed speech from prepared shards (`KEY.flac` + `KEY.txt`, as `d2v.data.prepare audio`
writes them for a LibriSpeech-style tree) for CTC fine-tuning (README, fine-tuning). Small sets only:
everything is decoded into memory.
"""
from __future__ import annotations

import io
import re
from typing import NamedTuple

import numpy as np
import soundfile


ALLOWED = re.compile(r"[A-Z' ]*")
"""LibriSpeech's transcript alphabet: upper-case letters, apostrophes, spaces (the CTC labels)."""


def normalize_transcript(text: str, where: str = "transcript") -> str:
    """Upper case, single spaces; anything but letters, apostrophes and spaces is an error."""
    clean = " ".join(text.upper().split())
    if not ALLOWED.fullmatch(clean):
        bad = sorted(set(re.sub(r"[A-Z' ]", "", clean)))
        raise ValueError(f"{where}: characters {bad} are outside the CTC alphabet (letters, apostrophe, space); "
                         f"normalise the transcripts (e.g. spell out digits) before fine-tuning")
    return clean


class Utterance(NamedTuple):
    key: str
    wav: np.ndarray
    """float32 mono waveform at the shards' rate."""
    text: str


def read_transcribed(pattern: str, *, sample_rate: int = 16_000) -> list[Utterance]:
    """Every sample of the shards, in shard order; a sample without a transcript or at another rate
    is an error naming it."""
    from d2v.data.shards import expand_pattern, iter_samples

    out = []
    # Every rank reads every shard on purpose (the fine-tuning loop splits batches, not shards).
    for key, sample in (s for path in expand_pattern(pattern) for s in iter_samples(path)):
        if "txt" not in sample:
            raise ValueError(f"{pattern}: sample {key} has no transcript (.txt); prepare the data from a tree with "
                             f"*.trans.txt files")
        audio = sample.get("flac") or sample.get("wav")
        if audio is None:
            raise ValueError(f"{pattern}: sample {key} has no flac/wav field")
        wav, rate = soundfile.read(io.BytesIO(audio), dtype="float32", always_2d=True)
        if rate != sample_rate:
            raise ValueError(f"{pattern}: sample {key} is at {rate} Hz, the model expects {sample_rate} Hz; "
                             f"prepare the data with `python -m d2v.data.prepare audio`")
        text = sample["txt"].decode("utf-8") if isinstance(sample["txt"], bytes) else str(sample["txt"])
        out.append(Utterance(key, wav.mean(axis=1), text.strip()))
    if not out:
        raise ValueError(f"{pattern}: no samples")
    return out
