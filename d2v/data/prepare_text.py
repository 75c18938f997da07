"""`python -m d2v.data.prepare text SRC OUT [--vocab-size N | --tokenizer FILE] [--block-size 512]`:
plain-text files into WebDataset shards of fixed-length token blocks.

SRC is a text file or a folder of them; blank lines separate documents. With --vocab-size a
SentencePiece model is trained on SRC (RoBERTa special ids); with --tokenizer an existing
SentencePiece .model or a GPT-2 BPE tokenizer.json is used. Documents are encoded, each ended
with `</s>`, concatenated and cut into blocks of block_size - 1 tokens, each prefixed with
`<s>` (the reference's 512 = 511 + `<s>`); the last partial block is padded with `<pad>`.
`tokenizer.json` (d2v's metadata) beside the shards records the tokenizer kind, vocabulary size,
special ids and file hash; training refuses shards whose tokenizer disagrees with the model.
Files that are not valid text in `--encoding` are skipped and listed, never decoded with
replacement characters.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
from typing import Any, Iterator

import numpy as np

from d2v.data.shard_writer import ShardWriter, check_output, claim_output, naming_full_disk, write_sidecar
from d2v.data.tokenizer import Tokenizer, train_sentencepiece


def read_documents(src: str, problems: list[dict[str, str]] | None = None, *,
                   encoding: str = "utf-8") -> Iterator[str]:
    """Documents (blank-line separated) of `src`, a .txt file or a folder of them.

    A file that is not valid text in `encoding` (or holds NUL or other control characters, as
    binary data does) is left out whole and added to `problems` with the reason: tokenising
    replacement characters would train the vocabulary and the model on noise.
    """
    paths = [src] if os.path.isfile(src) else sorted(
        os.path.join(root, n) for root, _, names in os.walk(src) for n in names if n.endswith((".txt", ".text")))
    if not paths:
        raise ValueError(f"{src}: no .txt files")
    for path in paths:
        try:
            with open(path, "rb") as f:
                text = f.read().decode(encoding)
            bad = _CONTROL.search(text)
            if bad:
                raise ValueError(f"control character {bad.group()!r} at character {bad.start()}: not a text file")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            reason = (f"not valid {encoding} at byte {err.start}" if isinstance(err, UnicodeDecodeError) else str(err))
            if problems is None:
                raise ValueError(f"{path}: {reason}") from None
            problems.append({"path": path, "reason": reason})
            continue
        doc: list[str] = []
        for line in text.splitlines():
            if line.strip():
                doc.append(line.strip())
            elif doc:
                yield " ".join(doc)
                doc = []
        if doc:
            yield " ".join(doc)


# C0 controls other than tab, newline, carriage return and form feed, and DEL.
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")


def pack_blocks(docs: list[list[int]], block_size: int, *, bos: int, eos: int, pad: int) -> np.ndarray:
    """N×block_size int32 blocks: `<s>` + block_size-1 tokens of the `</s>`-separated stream."""
    stream = [t for doc in docs for t in doc + [eos]]
    body = block_size - 1
    n = -(-len(stream) // body)
    blocks = np.full((n, block_size), pad, dtype=np.int32)
    blocks[:, 0] = bos
    for i in range(n):
        chunk = stream[i * body:(i + 1) * body]
        blocks[i, 1:1 + len(chunk)] = chunk
    return blocks


def prepare_text(src: str, out: str, *, vocab_size: int | None = None, tokenizer: str | None = None,
                 block_size: int = 512, val_fraction: float = 0.05, samples_per_shard: int = 1000,
                 seed: int = 0, clean: bool = False, encoding: str = "utf-8") -> dict[str, Any]:
    if (vocab_size is None) == (tokenizer is None):
        raise ValueError("give exactly one of --vocab-size (train SentencePiece) or --tokenizer FILE")
    if not os.path.exists(src):
        raise FileNotFoundError(f"source {src} does not exist")
    check_output(out)
    # Read and checked before the output folder is claimed: the given tokenizer may live in it
    # (and --clean deletes earlier tokenizers there), and a bad one must not cost an earlier run.
    given = None
    if tokenizer is not None:
        if not os.path.isfile(tokenizer):
            raise FileNotFoundError(f"tokenizer file {tokenizer} does not exist")
        Tokenizer(tokenizer)
        given = (os.path.basename(tokenizer), open(tokenizer, "rb").read())
    claim_output(out, clean=clean)
    skipped: list[dict[str, str]] = []
    docs = list(read_documents(src, skipped, encoding=encoding))
    for s in skipped:
        print(f"skipped {s['path']}: {s['reason']}")
    if not docs:
        raise ValueError(f"{src}: no readable {encoding} documents ({len(skipped)} files skipped)")
    if tokenizer is None:
        tokenizer = train_sentencepiece(docs, os.path.join(out, "spm"), vocab_size, seed=seed)
    else:
        # not over d2v's own metadata file, which is also called tokenizer.json
        tokenizer = os.path.join(out, "bpe-tokenizer.json" if given[0] == "tokenizer.json" else given[0])
        with open(tokenizer, "wb") as f:
            f.write(given[1])
    tok = Tokenizer(tokenizer)
    info = tok.info
    if vocab_size is not None and info.vocab_size != vocab_size:
        print(f"note: the corpus supports {info.vocab_size - 1} pieces, so the vocabulary has {info.vocab_size} "
              f"entries (asked for {vocab_size}); set model.text.vocab_size={info.vocab_size}")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_val = max(1, int(len(docs) * val_fraction)) if len(docs) > 1 else 0
    splits = {"valid": [docs[i] for i in order[:n_val]], "train": [docs[i] for i in order[n_val:]]}
    counts, patterns, writers = {}, {}, []
    for name, texts in splits.items():
        blocks = pack_blocks([tok.encode(t) for t in texts], block_size, bos=info.bos_id, eos=info.eos_id,
                             pad=info.pad_id)
        writer = ShardWriter(out, name, max_count=samples_per_shard)
        for i, block in enumerate(blocks):
            buf = io.BytesIO()
            np.save(buf, block, allow_pickle=False)
            writer.write(f"{name}{i:08d}", {"tokens.npy": buf.getvalue()}, int((block != info.pad_id).sum()))
        writer.close()
        writers.append(writer)
        counts[name] = len(blocks)
        patterns[name] = writer.pattern()
    meta = {**info.as_dict(), "block_size": block_size, "documents": len(docs), "blocks": counts, "patterns": patterns,
            "encoding": encoding, "skipped": skipped}
    write_sidecar(out, writers)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m d2v.data.prepare text", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--vocab-size", type=int, default=None, help="train a SentencePiece model of this size")
    ap.add_argument("--tokenizer", default=None, help="an existing SentencePiece .model or tokenizers .json")
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encoding", default="utf-8", help="the corpus's text encoding; files not valid in it are skipped")
    ap.add_argument("--clean", action="store_true", help="delete an earlier prepare's shards in OUT first")
    args = ap.parse_args(argv)
    with naming_full_disk(args.out):
        meta = prepare_text(args.src, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                            block_size=args.block_size, val_fraction=args.val_fraction,
                            samples_per_shard=args.samples_per_shard, seed=args.seed, clean=args.clean,
                            encoding=args.encoding)
    print(f"{meta['documents']} documents -> {meta['blocks']} blocks of {meta['block_size']} tokens; "
          f"{meta['kind']} vocabulary of {meta['vocab_size']} (mask id {meta['mask_id']})")
    for name, pattern in meta["patterns"].items():
        print(f"{name}: {pattern}")
    return meta
