"""BEiT block masks and text span/BERT masks (docs/method.md §3.2)."""
import torch

from d2v.masking import apply_token_mask, block_mask_2d, text_span_mask


def test_block_masks_hit_the_target_exactly_with_top_up_and_never_exceed_it():
    g = torch.Generator().manual_seed(0)
    topped = block_mask_2d(300, (14, 14), num_masked=120, min_block=16, generator=g)
    assert (topped.sum(dim=1) == 120).all()
    raw = block_mask_2d(300, (14, 14), num_masked=120, min_block=16, top_up=False, generator=g)
    counts = raw.sum(dim=1)
    assert (counts <= 120).all() and (counts < 120).any()  # the reference generator stops short sometimes
    assert counts.float().mean() > 100


def test_block_masks_are_blocky():
    g = torch.Generator().manual_seed(1)
    m = block_mask_2d(50, (14, 14), num_masked=120, top_up=False, generator=g).view(50, 14, 14).float()
    # Neighbours of masked patches are mostly masked: far above the 0.61 of random masking.
    same = (m[:, :, 1:] == m[:, :, :-1]).float().mean()
    assert same > 0.8


def test_text_span_mask_rate_and_padding():
    g = torch.Generator().manual_seed(2)
    rates = [text_span_mask(1, 512, generator=g).float().mean().item() for _ in range(1000)]
    assert abs(sum(rates) / len(rates) - 0.31) < 0.01
    tokens = torch.randint(4, 100, (4, 64))
    tokens[2, 40:] = 1
    pad = tokens == 1
    sel = text_span_mask(4, 64, padding_mask=pad, generator=g)
    assert not (sel & pad).any()


def test_every_selected_token_becomes_mask_by_default_and_bert_mix():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, 99, (64, 128))
    sel = text_span_mask(64, 128, generator=g)
    out = apply_token_mask(tokens, sel, mask_id=99, generator=g)
    assert (out[sel] == 99).all() and torch.equal(out[~sel], tokens[~sel])
    sel = text_span_mask(64, 128, mask_prob=0.15, mask_length=1, generator=g)
    out = apply_token_mask(tokens, sel, mask_id=99, random_token_prob=0.1, leave_unmasked_prob=0.1, generator=g)
    masked = (out[sel] == 99).float().mean()
    unchanged = (out[sel] == tokens[sel]).float().mean()
    assert abs(masked - 0.8) < 0.05 and 0.07 < unchanged < 0.17  # 10% kept + random draws equal by chance
    assert abs(sel.float().mean() - 0.15) < 0.01
    assert ((out >= 4) & (out <= 99)).all()
