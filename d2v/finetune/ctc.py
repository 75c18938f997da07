"""Character CTC for speech recognition (Graves et al. 2006; wav2vec 2.0 / data2vec fine-tuning):
the vocabulary, the loss and greedy decoding.

Legend: B batch, T frames, V vocabulary (blank first).
Transcripts are upper-cased letters, apostrophes and spaces (LibriSpeech's alphabet); the space
is the word boundary token `|` as in fairseq's letter dictionaries.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from d2v.data.transcribed import normalize_transcript

BLANK = "<blank>"
WORD_BOUNDARY = "|"
# The letters of fairseq's LibriSpeech dictionary (dict.ltr.txt of examples/wav2vec), its order
# (by frequency); `|` is the word boundary.
FAIRSEQ_LETTERS = "| E T A O N I H S R D L U M W C F G Y P B V K ' X J Q Z".split()


class CharVocab:
    """index 0 = blank, 1 = `|` (space), then the other characters (sorted, or fairseq's order)."""

    def __init__(self, symbols: Sequence[str]) -> None:
        if list(symbols[:2]) != [BLANK, WORD_BOUNDARY] or len(set(symbols)) != len(symbols):
            raise ValueError(f"a CTC vocabulary starts with {BLANK!r}, {WORD_BOUNDARY!r} and has no duplicates, got "
                             f"{list(symbols)[:5]}...")
        self.symbols = list(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def from_transcripts(cls, texts: Iterable[str]) -> "CharVocab":
        chars = sorted({c for t in texts for c in normalize_transcript(t) if c != " "})
        return cls([BLANK, WORD_BOUNDARY] + chars)

    @classmethod
    def fairseq_letters(cls) -> "CharVocab":
        """Blank, then fairseq's letter dictionary: every LibriSpeech character, whichever a small
        training split happens to hold."""
        return cls([BLANK] + FAIRSEQ_LETTERS)

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        clean = normalize_transcript(text)
        unknown = sorted({c for c in clean if c != " " and c not in self.index})
        if unknown:
            raise ValueError(f"characters {unknown} of {text!r} are not in the vocabulary built from the training "
                             f"transcripts")
        return [self.index[WORD_BOUNDARY if c == " " else c] for c in clean]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids after CTC collapsing (no blanks) -> text with single spaces."""
        text = "".join(" " if self.symbols[i] == WORD_BOUNDARY else self.symbols[i] for i in ids)
        return " ".join(text.split())


CTC_REDUCTIONS = ("mean", "sentence")


def ctc_loss(logits_BTV: Tensor, frames_B: Tensor, targets: list[list[int]], reduction: str = "mean") -> Tensor:
    """The CTC negative log-likelihood over utterances: "mean" divides each by its target length,
    then averages (torch's `reduction="mean"`); "sentence" averages the plain sums (fairseq's ctc
    criterion with sentence_avg, so longer utterances weigh more). Impossible alignments (more
    labels than frames) give zero, not inf."""
    if reduction not in CTC_REDUCTIONS:
        raise ValueError(f"CTC reduction {reduction!r}: use one of {', '.join(CTC_REDUCTIONS)}")
    log_probs_TBV = F.log_softmax(logits_BTV.float(), dim=-1).transpose(0, 1)
    flat = torch.tensor([t for seq in targets for t in seq], dtype=torch.long)
    lengths = torch.tensor([len(seq) for seq in targets], dtype=torch.long)
    if bool((lengths == 0).any()):
        raise ValueError("an empty transcript has no CTC target; drop it from the data")
    per_utterance = F.ctc_loss(log_probs_TBV, flat.to(logits_BTV.device), frames_B.long(),
                               lengths.to(logits_BTV.device), blank=0, reduction="none", zero_infinity=True)
    if reduction == "mean":
        per_utterance = per_utterance / lengths.to(per_utterance.device, per_utterance.dtype)
    return per_utterance.mean()


def greedy_decode(logits_BTV: Tensor, frames_B: Tensor, vocab: CharVocab) -> list[str]:
    """Best path: the arg-max symbol per frame, repeats merged, blanks dropped."""
    best_BT = logits_BTV.argmax(dim=-1).cpu()
    out = []
    for row, n in zip(best_BT.tolist(), frames_B.tolist()):
        ids, prev = [], None
        for i in row[:int(n)]:
            if i != prev and i != 0:
                ids.append(i)
            prev = i
        out.append(vocab.decode(ids))
    return out
