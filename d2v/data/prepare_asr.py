"""`python -m d2v.data.prepare asr SRC OUT --train 10h --eval dev-clean dev-other ...`: the labelled
speech of the wav2vec 2.0 / data2vec fine-tuning experiments into transcribed shards (README, fine-tuning).

SRC holds (or is) either or both of
* `librispeech_finetuning/`, Libri-light's limited-supervision set: `1h/{0..5}/{clean,other}/SPK/CHAP/`
  (six 10-minute folds making the hour) and `9h/{clean,other}/SPK/CHAP/` (with 1h the 10 hours), each
  chapter folder holding `SPK-CHAP-UTT.flac` and `SPK-CHAP.trans.txt`; the `phones/` folder is not used;
* `LibriSpeech/`, its `dev-clean`, `dev-other`, `test-clean`, `test-other` (and train-*) as `SPK/CHAP/`.
Training splits: 10m (one fold, `--fold`), 1h, 10h, or a LibriSpeech folder name (train-clean-100, ...);
each evaluation set gets its own shards. Writes `train-*.tar` and `dev_clean-*.tar` ..., `lengths.json`,
`prepare_report.json` (per set: utterances, hours, skipped files with reasons) and `asr_sets.json`
(`train` pattern and the `eval_data` value for fine-tuning). Files without a transcript, or whose
transcript has characters outside LibriSpeech's alphabet, are skipped and counted.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from d2v.data.prepare_audio import TARGET_RATE, Utterance, _results, scan
from d2v.data.shard_writer import ShardWriter, check_output, claim_output, unique_keys, write_sidecar
from d2v.data.transcribed import normalize_transcript

FOLDS = 6
LIMITED = ("10m", "1h", "10h")
EVAL_SETS = ("dev-clean", "dev-other", "test-clean", "test-other")
SETS_NAME = "asr_sets.json"


def _root(src: str, name: str, marker: Sequence[str]) -> str | None:
    """SRC/name when it exists, SRC itself when it holds the marker folders, else None."""
    if os.path.isdir(os.path.join(src, name)):
        return os.path.join(src, name)
    if any(os.path.isdir(os.path.join(src, m)) for m in marker):
        return src
    return None


def limited_folders(src: str, split: str, fold: int = 0) -> list[str]:
    """The folders of a Libri-light limited-supervision split, each a SPK/CHAP tree."""
    root = _root(src, "librispeech_finetuning", ("1h", "9h"))
    if root is None:
        raise ValueError(f"{src} holds no librispeech_finetuning/ (nor 1h/ and 9h/): unpack Libri-light's "
                         f"librispeech_finetuning.tgz there")
    if not 0 <= fold < FOLDS:
        raise ValueError(f"--fold {fold}: the 1h split has folds 0..{FOLDS - 1}")
    folds = [fold] if split == "10m" else list(range(FOLDS))
    folders = [os.path.join(root, "1h", str(f), kind) for f in folds for kind in ("clean", "other")]
    if split == "10h":
        folders += [os.path.join(root, "9h", kind) for kind in ("clean", "other")]
    missing = [f for f in folders if not os.path.isdir(f)]
    if missing:
        raise ValueError(f"{root} is not the librispeech_finetuning layout: {missing[0]} is missing "
                         f"({len(missing)} of {len(folders)} folders of the {split} split)")
    return folders


def librispeech_folder(src: str, name: str) -> str:
    root = _root(src, "LibriSpeech", EVAL_SETS)
    folder = os.path.join(root, name) if root is not None else None
    if folder is None or not os.path.isdir(folder):
        raise ValueError(f"{src} holds no LibriSpeech/{name}/: unpack openslr.org/12's {name}.tar.gz there")
    return folder


def set_name(folder_name: str) -> str:
    """Shard prefix of a set: dev-clean -> dev_clean (a name for finetune.eval_data)."""
    return folder_name.replace("-", "_")


def _utterances(src: str, folders: list[str], skipped: list[dict[str, str]]) -> list[Utterance]:
    """Every transcribed file of the folders, its path relative to src."""
    out = []
    for folder in folders:
        for utt in scan(folder, skipped):
            rel = os.path.relpath(os.path.join(folder, utt.path), src)
            if utt.text is None:
                skipped.append({"path": rel, "reason": "no transcript line in a *.trans.txt beside it"})
                continue
            try:
                normalize_transcript(utt.text, rel)
            except ValueError as err:
                skipped.append({"path": rel, "reason": str(err)})
                continue
            out.append(dataclasses.replace(utt, path=rel))
    return out


def prepare_asr(src: str, out: str, *, train: str | None = "10h", fold: int = 0,
                eval_sets: Sequence[str] = EVAL_SETS, samples_per_shard: int | None = None,
                shard_size_mb: float | None = None, workers: int = 1, clean: bool = False) -> dict:
    """Writes the shards of the training split and of each evaluation set; returns the report."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source folder {src} does not exist")
    check_output(out)
    plan: dict[str, list[str]] = {}
    if train:
        plan["train"] = limited_folders(src, train, fold) if train in LIMITED else [librispeech_folder(src, train)]
    for name in eval_sets:
        plan[set_name(name)] = [librispeech_folder(src, name)]
    if not plan:
        raise ValueError("nothing to prepare: give a training split (--train) or evaluation sets (--eval)")
    claim_output(out, clean=clean)
    if shard_size_mb is None and samples_per_shard is None:
        shard_size_mb = 256.0
    max_bytes = int(shard_size_mb * 2**20) if shard_size_mb else None
    writers, report = [], {"source": src, "train_split": train, "fold": fold if train == "10m" else None, "sets": {}}
    for prefix, folders in plan.items():
        skipped: list[dict[str, str]] = []
        utts = _utterances(src, folders, skipped)
        if not utts:
            raise ValueError(f"{', '.join(folders)}: no transcribed audio files for the {prefix} set")
        # LibriSpeech ids are unique already; unique_keys only makes them safe tar member names.
        utts = [dataclasses.replace(u, key=k) for u, k in zip(utts, unique_keys([u.key for u in utts]))]
        writer = ShardWriter(out, prefix, max_bytes, samples_per_shard)
        written = 0
        for utt, flac, num_samples, rate, reason in _results(src, utts, workers):
            if flac is None:
                skipped.append({"path": utt.path, "reason": reason})
                continue
            meta = {"speaker": utt.path.split(os.sep)[-3], "chapter": utt.path.split(os.sep)[-2], "source": utt.path,
                    "orig_sample_rate": rate, "num_samples": num_samples}
            writer.write(utt.key, {"flac": flac, "json": json.dumps(meta, sort_keys=True).encode(),
                                   "txt": utt.text.encode("utf-8")}, num_samples)
            written += 1
        writer.close()
        writers.append(writer)
        lengths = [n for entries in writer.shards.values() for _, n in entries]
        report["sets"][prefix] = {"folders": [os.path.relpath(f, src) for f in folders], "utterances": written,
                                  "hours": round(sum(lengths) / TARGET_RATE / 3600, 4), "shards": len(writer.shards),
                                  "pattern": writer.pattern(), "skipped": skipped}
    write_sidecar(out, writers, sample_rate=TARGET_RATE,
                  totals={k: {"samples": v["utterances"], "pattern": v["pattern"]} for k, v in report["sets"].items()})
    sets = {"train": report["sets"].get("train", {}).get("pattern"),
            "eval_data": ";".join(f"{k}={v['pattern']}" for k, v in report["sets"].items() if k != "train")}
    report["asr_sets"] = sets
    with open(os.path.join(out, "prepare_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, SETS_NAME), "w") as f:
        json.dump(sets, f, indent=1)
    return report


def print_summary(report: dict) -> None:
    for name, s in report["sets"].items():
        print(f"{name}: {s['utterances']} utterances, {s['hours']:.3f} h, {s['shards']} shards: {s['pattern']} "
              f"({len(s['skipped'])} skipped)")
        for item in s["skipped"][:20]:
            print(f"  skipped {item['path']}: {item['reason']}")
    sets = report["asr_sets"]
    print(f"fine-tune with: --train-data '{sets['train']}' --eval-data '{sets['eval_data']}'")


def main(argv: Sequence[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m d2v.data.prepare asr", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--train", default="10h",
                    help="10m | 1h | 10h (Libri-light) | a LibriSpeech folder (train-clean-100) | none")
    ap.add_argument("--fold", type=int, default=0, help="10m: which 10-minute fold of 1h/ (0-5)")
    ap.add_argument("--eval", nargs="*", default=list(EVAL_SETS), help="LibriSpeech sets to evaluate on")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--shard-size-mb", type=float, help="start a new shard past this size (default 256)")
    size.add_argument("--samples-per-shard", type=int, help="utterances per shard")
    ap.add_argument("--workers", type=int, default=1, help="processes decoding and resampling")
    ap.add_argument("--clean", action="store_true", help="delete an earlier prepare's shards in OUT first")
    args = ap.parse_args(argv)
    report = prepare_asr(args.src, args.out, train=None if args.train == "none" else args.train, fold=args.fold,
                         eval_sets=args.eval, samples_per_shard=args.samples_per_shard,
                         shard_size_mb=args.shard_size_mb, workers=args.workers, clean=args.clean)
    print_summary(report)
    return report
