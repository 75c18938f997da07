"""Audio corpus → WebDataset shards, a length sidecar and a skip report (docs/method.md §1 and §4).

Input: a LibriSpeech-style tree (SPEAKER/CHAPTER/*.flac|*.wav with SPEAKER-CHAPTER.trans.txt
files) or any folder of audio files. Each file is read with soundfile, mixed to mono, resampled
to 16 kHz (soxr when installed, else scipy's resample_poly) and stored as 16-bit FLAC. A sample
holds `KEY.flac`, `KEY.json` (speaker, chapter, source path, original rate, num_samples) and,
when a transcript exists, `KEY.txt` (kept for CTC fine-tuning). Keys are the file stems with
every character outside [A-Za-z0-9_-] replaced (WebDataset reads dots as extensions), made
unique across all shards. Tars are written with fixed metadata, so shards are reproducible.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from math import gcd
from multiprocessing import Pool
from typing import Iterator, Sequence

import numpy as np
import soundfile

from d2v.data.shard_writer import ShardWriter, check_output, claim_output, unique_keys, write_sidecar

TARGET_RATE = 16_000
AUDIO_SUFFIXES = (".flac", ".wav", ".ogg")
REPORT_NAME = "prepare_report.json"


@dataclass(frozen=True)
class Utterance:
    path: str  # relative to the source root
    key: str
    speaker: str
    chapter: str
    text: str | None


def resample(wav: np.ndarray, rate: int, target: int = TARGET_RATE) -> np.ndarray:
    """float32 mono waveform at `target` Hz."""
    if rate == target:
        return wav.astype(np.float32, copy=False)
    try:
        import soxr  # optional: faster and as good

        return soxr.resample(wav, rate, target).astype(np.float32)
    except ImportError:
        from scipy.signal import resample_poly

        g = gcd(rate, target)
        return resample_poly(wav, target // g, rate // g).astype(np.float32)


def read_transcripts(path: str) -> dict[str, str]:
    """`UTTERANCE-ID text` lines of one *.trans.txt file; raises ValueError naming the file and the
    byte where it stops being UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8 at byte {err.start} (its utterances are written without "
                         f"transcripts; re-encode it as UTF-8 to keep them)") from None
    out = {}
    for line in text.splitlines():
        utt, _, words = line.strip().partition(" ")
        if utt:
            out[utt] = words
    return out


def scan(src: str, problems: list[dict[str, str]] | None = None) -> list[Utterance]:
    """Every audio file under `src` with its transcript (from *.trans.txt files), sorted by path.
    A transcript file that cannot be read is added to `problems` (path, reason), not fatal."""
    texts: dict[str, str] = {}
    files: list[str] = []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            if name.endswith(".trans.txt"):
                try:
                    texts.update(read_transcripts(full))
                except (OSError, ValueError) as err:
                    if problems is None:
                        raise ValueError(f"{full}: {err}") from None
                    problems.append({"path": os.path.relpath(full, src), "reason": str(err)})
            elif name.lower().endswith(AUDIO_SUFFIXES):
                files.append(os.path.relpath(full, src))
    files.sort()
    stems = [os.path.splitext(os.path.basename(rel))[0] for rel in files]
    out: list[Utterance] = []
    # Same stem in two folders, or two stems that sanitize alike: numbered in path order.
    for rel, stem, key in zip(files, stems, unique_keys(stems)):
        parts = rel.split(os.sep)
        speaker = parts[0] if len(parts) >= 2 else ""  # a plain folder of files has no speakers
        chapter = parts[1] if len(parts) >= 3 else ""
        out.append(Utterance(rel, key, speaker, chapter, texts.get(stem)))
    return out


def _encode(args: tuple[str, Utterance]) -> tuple[Utterance, bytes | None, int, int, str]:
    """(utterance, FLAC bytes or None, num_samples, original rate, reason it was skipped)."""
    src, utt = args
    try:
        wav, rate = soundfile.read(os.path.join(src, utt.path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for unreadable files
        return utt, None, 0, 0, f"unreadable: {type(err).__name__}: {err}"
    if wav.shape[0] == 0:
        return utt, None, 0, rate, "empty audio"
    mono = resample(wav.mean(axis=1), rate)
    if not np.isfinite(mono).all():
        return utt, None, 0, rate, "non-finite samples"
    buf = io.BytesIO()
    soundfile.write(buf, np.clip(mono, -1.0, 1.0), TARGET_RATE, format="FLAC", subtype="PCM_16")
    return utt, buf.getvalue(), len(mono), rate, ""


def _is_validation(utt: Utterance, val_fraction: float, val_speakers: set[str]) -> bool:
    if val_speakers:
        return utt.speaker in val_speakers
    # A hash of the key, not a random draw: the split stays put when files are added.
    return int(hashlib.sha1(utt.key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction


def _results(src: str, utts: list[Utterance], workers: int) -> Iterator[tuple[Utterance, bytes | None, int, int, str]]:
    jobs = [(src, u) for u in utts]
    if workers <= 1:
        yield from map(_encode, jobs)
        return
    with Pool(workers) as pool:
        yield from pool.imap(_encode, jobs, chunksize=8)  # imap keeps the input order


def prepare_audio(src: str, out: str, *, shard_size_mb: float | None = None, samples_per_shard: int | None = None,
                  val_fraction: float = 0.01, val_speakers: Sequence[str] = (), workers: int = 1,
                  clean: bool = False) -> dict:
    """Writes train/val shards, `lengths.json` and `prepare_report.json` into `out`; returns the report."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source folder {src} does not exist")
    check_output(out)
    skipped: list[dict[str, str]] = []
    utts = scan(src, skipped)
    bad_transcripts = len(skipped)
    if not utts:
        raise ValueError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {src}")
    claim_output(out, clean=clean)
    if shard_size_mb is None and samples_per_shard is None:
        shard_size_mb = 256.0
    max_bytes = int(shard_size_mb * 2**20) if shard_size_mb else None
    writers = {split: ShardWriter(out, split, max_bytes, samples_per_shard) for split in ("train", "val")}
    unknown = set(val_speakers) - {u.speaker for u in utts}
    if unknown:
        raise ValueError(f"validation speakers not found under {src}: {sorted(unknown)}")
    without_text = 0
    for utt, flac, num_samples, rate, reason in _results(src, utts, workers):
        if flac is None:
            skipped.append({"path": utt.path, "reason": reason})
            continue
        meta = {"speaker": utt.speaker, "chapter": utt.chapter, "source": utt.path,
                "orig_sample_rate": rate, "num_samples": num_samples}
        fields = {"flac": flac, "json": json.dumps(meta, sort_keys=True).encode()}
        if utt.text is not None:
            fields["txt"] = utt.text.encode("utf-8")
        else:
            without_text += 1
        split = "val" if _is_validation(utt, val_fraction, set(val_speakers)) else "train"
        writers[split].write(utt.key, fields, num_samples)
    for w in writers.values():
        w.close()
    totals = {}
    for split, w in writers.items():
        lengths = [n for entries in w.shards.values() for _, n in entries]
        totals[split] = {"shards": len(w.shards), "samples": len(lengths), "num_samples": int(sum(lengths)),
                         "hours": round(sum(lengths) / TARGET_RATE / 3600, 4),
                         "pattern": w.pattern()}
    write_sidecar(out, list(writers.values()), sample_rate=TARGET_RATE, totals=totals)
    report = {"source": src, "files": len(utts), "written": len(utts) - (len(skipped) - bad_transcripts), "skipped": skipped,
              "without_transcript": without_text, "totals": totals}
    with open(os.path.join(out, REPORT_NAME), "w") as f:
        json.dump(report, f, indent=1)
    return report


def print_summary(report: dict) -> None:
    print(f"{report['written']} of {report['files']} files written from {report['source']} "
          f"({report['without_transcript']} without transcript)")
    for split, t in report["totals"].items():
        if t["shards"]:
            print(f"  {split}: {t['samples']} utterances, {t['hours']:.3f} h, {t['shards']} shards: {t['pattern']}")
    for s in report["skipped"]:
        print(f"  skipped {s['path']}: {s['reason']}")
