"""Token blocks to masked text batches (docs/method.md §3.2): the collate step selects spans (or BERT's
15%) and writes the student's view (`<mask>`, random or unchanged tokens); the clean tokens stay
the teacher's input. Padding is never selected.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from d2v.batch import Batch
from d2v.masking import apply_token_mask


def decode_tokens(sample: dict) -> torch.Tensor:
    data = sample.get("tokens.npy")
    if data is None:
        raise KeyError(f"sample {sample.get('__key__')} has no tokens.npy field (fields: {sorted(sample)})")
    arr = np.load(io.BytesIO(data)) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
    return torch.from_numpy(arr.astype(np.int64))


def load_tokenizer_meta(shard_pattern: str) -> dict:
    """The tokenizer.json written beside the shards by `prepare text`."""
    first = shard_pattern.split("{")[0]
    path = os.path.join(os.path.dirname(first), "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: text shards must be written by `python -m d2v.data.prepare text`")
    with open(path) as f:
        return json.load(f)


def check_tokenizer(meta: dict, text_cfg, block_size: int | None = None) -> None:
    """The shards' tokenizer must be the one the model's embedding was sized for."""
    want = {"vocab_size": text_cfg.vocab_size, "pad_id": text_cfg.pad_id, "bos_id": text_cfg.bos_id,
            "eos_id": text_cfg.eos_id, "unk_id": text_cfg.unk_id}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise ValueError(f"tokenizer/vocabulary mismatch: the shards were tokenized with {meta.get('kind')} "
                         f"{got}, the model expects {want}; set model.text.vocab_size={meta.get('vocab_size')} "
                         f"(and the special ids) or re-tokenize the data")
    if meta.get("mask_id") != text_cfg.vocab_size - 1:
        raise ValueError(f"the shards' <mask> id {meta.get('mask_id')} is not the last id {text_cfg.vocab_size - 1}")
    if block_size is not None and meta.get("block_size", block_size) > text_cfg.max_positions:
        raise ValueError(f"blocks of {meta['block_size']} tokens exceed model.text.max_positions={text_cfg.max_positions}")


@dataclass(frozen=True)
class TokenView:
    """How the student's token-level view replaces the selected tokens (a student that fills the
    masked positions; one that drops them sees no masked view)."""

    mask_id: int
    random_token_prob: float = 0.0
    leave_unmasked_prob: float = 0.0


def text_collate(blocks: list[torch.Tensor], keys: list[str], *, pad_id: int, masks, token_view: TokenView | None,
                 g: torch.Generator) -> Batch:
    """masks: the run's mask maker (d2v.masking.makers); padding is passed to it, and stays marked
    where a mask covers it (the task never regresses padded positions)."""
    tokens = torch.stack(blocks)
    padding = tokens.eq(pad_id)
    mask = masks(tokens.shape[0], tokens.shape[1], padding, g)
    masked = None
    if token_view is not None:
        masked = apply_token_mask(tokens, mask, mask_id=token_view.mask_id,
                                  random_token_prob=token_view.random_token_prob,
                                  leave_unmasked_prob=token_view.leave_unmasked_prob, generator=g)
    return Batch(source=tokens, mask=mask, masked_source=masked,
                 padding_mask=padding if bool(padding.any()) else None, keys=keys)


class TextBatchMaker:
    """The loader's BatchMaker for token-block shards (d2v.data.loader). A block that cannot be
    decoded, is longer than the model's positions or holds an id outside the vocabulary is counted
    as `corrupt` and left out of its batch."""

    def __init__(self, *, max_positions: int, vocab_size: int, first_regular_id: int, collate) -> None:
        # collate(blocks, keys, generator) -> Batch: the masking the run configured
        self.max_positions, self.vocab_size, self.collate = max_positions, vocab_size, collate
        self.first_regular_id = first_regular_id

    def __call__(self, raw: list[tuple[str, dict[str, bytes]]], generator: torch.Generator,
                 stats: dict[str, int]) -> Batch | None:
        blocks, keys = [], []
        for key, fields in raw:
            try:
                block = decode_tokens(fields)
                if block.ndim != 1 or not 0 < block.numel() <= self.max_positions:
                    raise ValueError(f"block of shape {tuple(block.shape)}")
                if int(block.min()) < 0 or int(block.max()) >= self.vocab_size:
                    raise ValueError("token id outside the vocabulary")
            except Exception:  # noqa: BLE001 - numpy raises many types for damaged arrays
                stats["corrupt"] = stats.get("corrupt", 0) + 1
                continue
            if blocks and block.numel() != blocks[0].numel():
                stats["corrupt"] = stats.get("corrupt", 0) + 1  # blocks of one batch share a length
                continue
            blocks.append(block)
            keys.append(key)
        return self.collate(blocks, keys, generator) if blocks else None

    def filler(self, generator: torch.Generator) -> Batch:
        # Regular tokens (no padding): every mask kind finds positions to select in it.
        block = torch.randint(self.first_regular_id, self.vocab_size - 1, (self.max_positions,), generator=generator)
        return self.collate([block], ["<filler>"], generator)
