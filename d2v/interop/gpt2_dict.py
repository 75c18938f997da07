"""fairseq's text vocabulary -> a tokenizer's ids.

fairseq RoBERTa-style models index their embedding by `dict.txt` order: row 0-3 are `<s>`,
`<pad>`, `</s>`, `<unk>`, row 4+i is the i-th line of dict.txt (a GPT-2 BPE id written as a
number, ordered by corpus frequency), and `<mask>` is appended last by the masked-LM task. The
same GPT-2 id therefore sits in a different row than in any tokenizer that numbers tokens
otherwise, and pairing the rows with a tokenizer without this map silently scrambles the
embedding. `remap_rows` moves every row to the tokenizer's id for the same token.

The tokenizer is either one given (a tokenizers JSON whose vocabulary holds GPT-2 BPE strings
and RoBERTa's special ids) or one built here from encoder.json + vocab.bpe with ids `<s>` 0,
`<pad>` 1, `</s>` 2, `<unk>` 3, GPT-2 id g -> 4 + g, `<mask>` last.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from torch import Tensor

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


@dataclass
class Remap:
    rows: Tensor
    """Remapped embedding (tokenizer vocabulary size × D)."""
    tokenizer_json: str
    """The tokenizers JSON (text) whose ids index `rows`."""
    dropped_symbols: list[str]
    """dict.txt symbols the tokenizer cannot produce (e.g. madeupword0000): their rows are not kept."""
    filled_from_unk: list[str]
    """Tokenizer tokens dict.txt lacks: they get the `<unk>` row."""


def read_dict(path: str) -> list[str]:
    """The symbols of a fairseq dict.txt, in order (`SYMBOL COUNT [#fairseq:overwrite]` per line)."""
    symbols = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split(" ")
            if len(parts) < 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path}:{n}: expected 'SYMBOL COUNT', got {line.strip()!r}")
            symbols.append(parts[0])
    return symbols


def fairseq_symbols(dict_path: str, num_rows: int) -> list[str]:
    """Row -> symbol of a fairseq masked-LM embedding; checks the row count."""
    symbols = list(SPECIALS) + read_dict(dict_path) + ["<mask>"]
    if len(symbols) != num_rows:
        raise ValueError(f"the embedding has {num_rows} rows but {dict_path} gives {len(symbols)} "
                         f"(4 specials + {len(symbols) - 5} entries + <mask>): it is not the dictionary of this "
                         f"checkpoint")
    return symbols


def build_gpt2_tokenizer(encoder_json: str, vocab_bpe: str) -> str:
    """A byte-level BPE tokenizers JSON with d2v's ids (specials 0-3, 4 + GPT-2 id, <mask> last)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")
                  if line and not line.startswith("#version")]
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for token, gpt2_id in encoder.items():
        vocab[token] = len(SPECIALS) + int(gpt2_id)
    vocab["<mask>"] = len(SPECIALS) + max(int(v) for v in encoder.values()) + 1
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{encoder_json}: GPT-2 ids are not distinct")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return tok.to_str()


def remap_rows(rows: Tensor, symbols: list[str], encoder_json: str, tokenizer_json: str) -> Remap:
    """Moves each fairseq row (row i = symbols[i]) to the tokenizer's id of the same token."""
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    added = {t["content"]: t["id"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
    vocab = {**vocab, **added}
    size = max(vocab.values()) + 1
    want = {**{s: i for i, s in enumerate(SPECIALS)}, "<mask>": size - 1}
    got = {s: vocab.get(s) for s in want}
    if got != want:
        raise ValueError(f"the tokenizer has special ids {got}; d2v needs {want} (RoBERTa's, <mask> last)")
    row_of = {}  # tokenizer token string -> fairseq row
    for row, sym in enumerate(symbols):
        if sym in SPECIALS or sym == "<mask>":
            row_of[sym] = row
    by_gpt2 = {str(v): k for k, v in encoder.items()}
    dropped = []
    for row, sym in enumerate(symbols):
        if sym in SPECIALS or sym == "<mask>":
            continue
        token = by_gpt2.get(sym)
        if token is None or token not in vocab:
            dropped.append(sym)
        else:
            row_of[token] = row
    out = rows.new_zeros(size, rows.shape[1])
    filled = []
    for token, tid in vocab.items():
        if token in row_of:
            out[tid] = rows[row_of[token]]
        else:
            out[tid] = rows[row_of["<unk>"]]
            filled.append(token)
    return Remap(out, tokenizer_json, dropped, sorted(filled))
