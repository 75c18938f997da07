"""Tokenizers with RoBERTa's special ids (docs/method.md §8): `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3,
`<mask>` the last id.

* SentencePiece: trained here (`train_sentencepiece`) with those four ids; `<mask>` is appended
  after the model's pieces, so vocab_size = pieces + 1.
* GPT-2 byte-level BPE from a `tokenizer.json` (the `tokenizers` package), so that public
  RoBERTa-family vocabularies fit: its own ids are used as they are and must put `<s>`, `<pad>`,
  `</s>`, `<unk>` at 0-3 and `<mask>` last (roberta-base's does: 50,265 entries).

`TokenizerInfo` is what the shards record; training compares it with the model config and
refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Iterable

SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3}


@dataclass
class TokenizerInfo:
    kind: str
    """sentencepiece | bpe"""
    vocab_size: int
    """Embedding rows needed, `<mask>` included."""
    bos_id: int
    pad_id: int
    eos_id: int
    unk_id: int
    mask_id: int
    file: str
    """Tokenizer file name (beside the shards)."""
    sha256: str
    """Hash of the tokenizer file: shards and checkpoints name the exact vocabulary."""

    def as_dict(self) -> dict:
        return asdict(self)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(err: BaseException) -> str:
    """A library's message, one line (some carry a C++ stack or a JSON excerpt)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int, *, seed: int = 0) -> str:
    """Trains a unigram SentencePiece model with RoBERTa's special ids; returns the .model path.
    The model has vocab_size - 1 pieces: `<mask>` takes the last id."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)  # the trainer's sampling is seeded globally
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=model_prefix, vocab_size=vocab_size - 1,
        model_type="unigram", bos_id=0, pad_id=1, eos_id=2, unk_id=3, character_coverage=1.0,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=2,
        minloglevel=2, hard_vocab_limit=False)
    return model_prefix + ".model"


class Tokenizer:
    def __init__(self, path: str) -> None:
        self.path = path
        if path.endswith(".model"):
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_file=path)
            except (RuntimeError, OSError) as err:  # its parser reports garbage as RuntimeError
                raise ValueError(f"{path} is not a readable SentencePiece model ({_first_line(err)})") from None
            pieces = self._sp.get_piece_size()
            ids = {"bos": self._sp.bos_id(), "pad": self._sp.pad_id(), "eos": self._sp.eos_id(), "unk": self._sp.unk_id()}
            if ids != SPECIALS:
                raise ValueError(f"{path}: special ids {ids} differ from RoBERTa's {SPECIALS}; train it with "
                                 f"`python -m d2v.data.prepare text ... --vocab-size N`")
            self.info = TokenizerInfo("sentencepiece", pieces + 1, 0, 1, 2, 3, pieces, os.path.basename(path),
                                      _sha256(path))
            self._encode = lambda text: self._sp.encode(text)
        elif path.endswith(".json"):
            from tokenizers import Tokenizer as HfTokenizer

            try:
                self._hf = HfTokenizer.from_file(path)
            except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for bad files
                raise ValueError(f"{path} is not a readable tokenizers file ({_first_line(err)})") from None
            vocab = self._hf.get_vocab(with_added_tokens=True)
            ids = {k: vocab.get(t) for k, t in (("bos", "<s>"), ("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>"))}
            mask = vocab.get("<mask>")
            size = max(vocab.values()) + 1
            if ids != SPECIALS or mask != size - 1:
                raise ValueError(f"{path}: special ids {ids}, <mask> {mask} of {size}: d2v needs RoBERTa's "
                                 f"{SPECIALS} and <mask> last")
            self.info = TokenizerInfo("bpe", size, 0, 1, 2, 3, mask, os.path.basename(path), _sha256(path))
            self._encode = lambda text: self._hf.encode(text, add_special_tokens=False).ids
        else:
            raise ValueError(f"{path}: expected a SentencePiece .model or a tokenizers .json file")

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i != self.info.mask_id]
        if hasattr(self, "_sp"):
            return self._sp.decode(ids)
        return self._hf.decode(ids)
