"""Token embeddings in the RoBERTa layout (data2vec 1.0 text, docs/method.md §3.2, §8).

x = LayerNorm(word[ids] + position[pos(ids)] + token_type[0]), with pos = pad_id + the running
count of real tokens (so positions start at pad_id + 1 and 512-token inputs need 514 rows).
Names map onto transformers' Data2VecTextModel `embeddings.*` one-to-one.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from d2v.models.audio import Features, Known


def position_ids(tokens_BT: Tensor, pad_id: int) -> Tensor:
    real = tokens_BT.ne(pad_id).long()
    return torch.cumsum(real, dim=1) * real + pad_id


class TextEmbedding(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, pad_id: int, dim: int, eps: float) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.max_positions = max_positions
        self.word_embeddings = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(max_positions + pad_id + 1, dim, padding_idx=pad_id)
        self.token_type_embeddings = nn.Embedding(1, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def check_input(self, tokens_BT: Tensor) -> None:
        """Raises on token ids the embedding cannot take (run on the host copy in training)."""
        if tokens_BT.shape[1] > self.max_positions:
            raise ValueError(f"sequence of {tokens_BT.shape[1]} tokens exceeds max_positions={self.max_positions}")
        if tokens_BT.numel() and (int(tokens_BT.max()) >= self.word_embeddings.num_embeddings
                                  or int(tokens_BT.min()) < 0):
            raise ValueError(f"token ids outside [0, {self.word_embeddings.num_embeddings}): tokenizer and "
                             f"model.text.vocab_size disagree")

    def forward(self, tokens_BT: Tensor, lengths: Tensor | None = None, known: Known | None = None) -> Features:
        if known is None:
            self.check_input(tokens_BT)
        x = self.word_embeddings(tokens_BT) + self.position_embeddings(position_ids(tokens_BT, self.pad_id))
        x = self.LayerNorm(x + self.token_type_embeddings.weight[0])
        if known is not None:
            return Features(x, known.padding_mask)
        padding = tokens_BT.eq(self.pad_id)
        return Features(x, padding if bool(padding.any()) else None)
