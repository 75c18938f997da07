"""`python -m d2v.data.prepare {audio,asr,image,text} SRC OUT ...`: raw corpora into WebDataset shards
(`prepare glue SRC` checks GLUE's TSV layout, which fine-tuning reads in place).

Each modality lives in its own module (`prepare_audio`, `prepare_image`, `prepare_text`); this
one dispatches on the first argument.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from d2v.data.prepare_audio import prepare_audio, print_summary
from d2v.data.shard_writer import naming_full_disk


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m d2v.data.prepare", description=__doc__)
    sub = parser.add_subparsers(dest="modality", required=True)
    audio = sub.add_parser("audio", help="LibriSpeech-style tree or folder of flac/wav → 16 kHz FLAC shards")
    audio.add_argument("src")
    audio.add_argument("out")
    size = audio.add_mutually_exclusive_group()
    size.add_argument("--shard-size-mb", type=float, help="start a new shard past this size (default 256)")
    size.add_argument("--samples-per-shard", type=int, help="utterances per shard")
    val = audio.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.01,
                     help="fraction of utterances held out (by a hash of the key); default 0.01")
    val.add_argument("--val-speakers", nargs="+", default=[], help="hold out these speakers instead")
    audio.add_argument("--workers", type=int, default=1, help="processes decoding and resampling")
    audio.add_argument("--clean", action="store_true", help="delete an earlier prepare's shards in OUT first")
    for name in ("asr", "image", "text", "glue"):
        other = sub.add_parser(name, help=f"see python -m d2v.data.prepare {name} --help", add_help=False)
        other.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Bad input (a missing source, an unwritable or full output folder, an unreadable tokenizer)
    is one `error:` line and exit code 2, as `python -m d2v` does; D2V_TRACEBACK=1 re-raises."""
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except (ValueError, KeyError, OSError) as err:
        if os.environ.get("D2V_TRACEBACK"):
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)  # what to change, not a traceback
        return 2


def error_line(err: BaseException) -> str:
    """The message of `err` on one line, without a KeyError's quotes or an OSError's `[Errno N]`."""
    if isinstance(err, KeyError) and err.args:
        message = str(err.args[0])
    elif isinstance(err, OSError) and err.strerror:
        message = err.strerror + (f": {err.filename}" if err.filename is not None else "")
    else:
        message = str(err)
    return " ".join(line.strip() for line in message.splitlines() if line.strip()) or type(err).__name__


# Modalities whose `prepare` has its own module (audio's is this one).
OTHER_PREPARES = {"asr": "d2v.data.prepare_asr", "image": "d2v.data.prepare_image", "text": "d2v.data.prepare_text",
                  "glue": "d2v.data.glue"}


def _run(argv: list[str]) -> int:
    if argv and argv[0] in OTHER_PREPARES:
        importlib.import_module(OTHER_PREPARES[argv[0]]).main(argv[1:])
        return 0
    args = _parser().parse_args(argv)
    with naming_full_disk(args.out):
        report = prepare_audio(args.src, args.out, shard_size_mb=args.shard_size_mb,
                               samples_per_shard=args.samples_per_shard,
                               val_fraction=0.0 if args.val_speakers else args.val_fraction,
                               val_speakers=args.val_speakers, workers=args.workers, clean=args.clean)
    print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
