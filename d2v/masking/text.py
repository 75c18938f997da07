"""Text masking (data2vec 1.0 text, docs/method.md §3.2; fairseq's MaskTokensDataset).

`text_span_mask`: per row of n real tokens, k = int(p·n/L + U[0,1)) distinct starts, each
expanded to L tokens (clipped at the row end); overlaps merge, so p=0.35, L=4 selects ≈31%.
BERT masking is the same selection with L=1 and p=0.15. `apply_token_mask` then writes the
student's view: selected tokens become `<mask>` except a `random_token_prob` share (random
ordinary tokens) and a `leave_unmasked_prob` share (unchanged). d2v takes the loss on all
selected positions (the paper's description), not only on those that became `<mask>`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def text_span_mask(
    batch_size: int,
    seq_len: int,
    *,
    mask_prob: float = 0.35,
    mask_length: int = 4,
    padding_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """B×T bool selection (True = the student must predict this token); padding never selected."""
    if not 0.0 <= mask_prob <= 1.0 or mask_length < 1:
        raise ValueError(f"need 0 <= mask_prob <= 1 and mask_length >= 1, got {mask_prob}, {mask_length}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    valid = ~padding_mask if padding_mask is not None else torch.ones(batch_size, seq_len, dtype=torch.bool)
    out = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    for b in range(batch_size):
        positions = valid[b].nonzero().flatten()
        n = positions.numel()
        if n == 0:
            continue
        k = min(n, int(mask_prob * n / mask_length + torch.rand((), generator=g).item()))
        starts = torch.randperm(n, generator=g)[:k]
        idx = (starts[:, None] + torch.arange(mask_length)[None, :]).flatten().clamp_(max=n - 1)
        out[b, positions[idx]] = True
    return out


def apply_token_mask(
    tokens: Tensor,
    selected: Tensor,
    *,
    mask_id: int,
    num_special: int = 4,
    random_token_prob: float = 0.0,
    leave_unmasked_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The student's tokens: selected positions become `<mask>`, a random ordinary token
    (ids num_special .. mask_id-1), or stay unchanged, with the given probabilities."""
    if random_token_prob + leave_unmasked_prob > 1.0:
        raise ValueError("random_token_prob + leave_unmasked_prob must be <= 1")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    out = tokens.clone()
    u = torch.rand(tokens.shape, generator=g)
    to_mask = selected & (u >= random_token_prob + leave_unmasked_prob)
    to_random = selected & (u < random_token_prob)
    out[to_mask] = mask_id
    if to_random.any():
        out[to_random] = torch.randint(num_special, mask_id, (int(to_random.sum()),), generator=g)
    return out
