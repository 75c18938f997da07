"""data2vec 2.0 masks: exact counts per row, seeds (docs/method.md §3.3)."""
import pytest
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


@pytest.mark.parametrize("preset", ["audio_base", "image_base", "text_base", "audio_base_v2", "image_base_v2",
                                    "text_base_v2"])
def test_the_one_mask_maker_gives_what_the_kind_s_generator_gives(preset):
    """mask_maker(cfg) draws exactly what the kind's own generator draws from the same seed, with
    one mask per sample for a student that fills the masked positions and M for one that drops them."""
    from d2v.config import get_preset
    from d2v.config.mask_kinds import MASK_KINDS
    from d2v.masking import block_mask_2d, multi_mask_fn, span_mask, text_span_mask
    from d2v.masking.makers import MAKERS, mask_maker

    assert set(MAKERS) == set(MASK_KINDS.values())
    cfg = get_preset(preset)
    mk, T = cfg.masking, {"audio": 200, "image": 196, "text": 64}[cfg.model.modality]
    padding = None
    if cfg.model.modality == "text":
        padding = torch.zeros(3, T, dtype=torch.bool)
        padding[1, 50:] = True
    got = mask_maker(cfg)(3, T, padding, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    want = {
        "span": lambda: span_mask(3, T, mask_prob=mk.mask_prob, mask_length=mk.mask_length, min_masks=mk.min_masks,
                                  equalize=mk.equalize, generator=g),
        "block_2d": lambda: block_mask_2d(3, (14, 14), num_masked=mk.num_mask_patches,
                                          min_block=mk.min_block_patches, min_aspect=mk.min_aspect, generator=g),
        "text_span": lambda: text_span_mask(3, T, mask_prob=mk.mask_prob, mask_length=mk.mask_length,
                                            padding_mask=padding, generator=g),
    }.get(mk.kind, lambda: multi_mask_fn(cfg)(3, T, padding, g))()
    assert torch.equal(got, want)
    assert got.shape == ((3, cfg.model.v2.num_masks, T) if cfg.model.drops_masked else (3, T))
