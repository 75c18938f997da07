"""data2vec 2.0 masks: exact counts per row, seeds (docs/method.md §3.3)."""
import torch

from d2v.masking import block_mask_1d, inverse_block_mask_2d, random_mask


def test_block_mask_1d_exact_count_and_blocky():
    g = torch.Generator().manual_seed(0)
    m = block_mask_1d(16, 999, mask_prob=0.5, block=5, adjust=0.05, generator=g)
    assert (m.sum(1) == 499).all()
    runs = (torch.diff(m.int(), dim=1) == 1).sum(1).float().mean()
    assert runs < 499 / 2  # masked frames come in runs, not one by one
    assert torch.equal(m, block_mask_1d(16, 999, generator=torch.Generator().manual_seed(0)))


def test_inverse_block_mask_2d_keeps_exactly_39_of_196():
    m = inverse_block_mask_2d(32, (14, 14), generator=torch.Generator().manual_seed(1))
    assert ((~m).sum(1) == 39).all() and (m.sum(1) == 157).all()
    kept = (~m).view(32, 14, 14).float()
    neighbours = (kept[:, :, 1:] * kept[:, :, :-1]).sum() / kept[:, :, :-1].sum()
    assert neighbours > 0.3  # kept patches cluster in blocks (random keeping would give ~0.2)


def test_random_mask_text():
    m = random_mask(8, 512, mask_prob=0.48, padding_mask=None, generator=torch.Generator().manual_seed(2))
    assert ((~m).sum(1) == 266).all() and (m.sum(1) == 246).all()
    assert not torch.equal(m[0], m[1])
    # Padding: real tokens are kept first; a row with fewer real tokens than 266 keeps them all.
    pad = torch.zeros(2, 512, dtype=torch.bool)
    pad[0, 400:] = True
    pad[1, 100:] = True
    m = random_mask(2, 512, mask_prob=0.48, padding_mask=pad, generator=torch.Generator().manual_seed(3))
    assert ((~m).sum(1) == 266).all()
    assert not (~m[0] & pad[0]).any()  # 400 real tokens: all 266 kept among them
    assert (~m[1, :100]).all()  # 100 real tokens: every one kept, 166 pads fill the count
