"""Image and text preparation, tokenizers, augmentation and collation."""
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from d2v.config import get_preset
from d2v.data.image import ImageTransform, decode_image, image_collate, random_resized_crop_box
from d2v.masking.makers import BlockMasks2d, TokenSpanMasks
from d2v.data.prepare_image import prepare_image
from d2v.data.prepare_text import pack_blocks, prepare_text
from d2v.data.text import TokenView, check_tokenizer, decode_tokens, load_tokenizer_meta, text_collate
from d2v.data.tokenizer import Tokenizer


def _image_tree(root, corrupt=True):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        os.makedirs(root / cls)
        for i in range(6):
            arr = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{cls}.{i}.{'png' if i % 2 else 'jpg'}")
    if corrupt:
        (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "cat" / "odd.bmp")


def test_prepare_image_keeps_labels_and_reports_unreadable_files(tmp_path):
    _image_tree(tmp_path / "tree")
    report = prepare_image(str(tmp_path / "tree"), str(tmp_path / "shards"), samples_per_shard=4, val_fraction=0.2)
    assert [s["path"] for s in report["skipped"]] == [os.path.join("dog", "broken.jpg")]
    assert report["samples"]["train"] + report["samples"]["valid"] == 13
    assert json.load(open(tmp_path / "shards" / "classes.json")) == ["cat", "dog"]
    names = []
    for shard in sorted(os.listdir(tmp_path / "shards")):
        if shard.endswith(".tar"):
            with tarfile.open(tmp_path / "shards" / shard) as tar:
                names += tar.getnames()
    keys = {n.rsplit(".", 1)[0] for n in names}
    assert all("." not in k for k in keys) and len(keys) == 13
    assert any(n.endswith(".png") for n in names if n.startswith("cat_odd_bmp"))  # re-encoded bmp
    assert all(n.rsplit(".", 1)[1] in ("jpg", "png", "cls", "json") for n in names)


def test_random_resized_crop_and_transform():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        left, top, w, h = random_resized_crop_box(40, 30, g, scale=(0.2, 1.0))
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        assert w * h >= 0.2 * 40 * 30 * 0.8
    im = Image.fromarray(np.full((30, 40, 3), 128, dtype=np.uint8))
    t = ImageTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = t(im, torch.Generator().manual_seed(1))
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-5)
    a, b = (t(decode_image({"png": _png(i)}), torch.Generator().manual_seed(7)) for i in (0, 0))
    assert torch.equal(a, b)


def test_color_jitter_matches_hand_computed_brightness_contrast_saturation():
    """BEiT's ColorJitter(0.4, 0.4, 0.4): each factor uniform in [0.6, 1.4], the three in random order;
    checked against float64 blends (brightness with black, contrast with the mean grey, saturation
    with the grey image), up to Pillow's rounding to 8 bits after each step."""
    from d2v.data.image import color_jitter

    rgb = np.random.default_rng(3).integers(0, 255, (20, 28, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    assert color_jitter(im, 0.0, torch.Generator().manual_seed(0)) is im
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        out = np.asarray(color_jitter(im, 0.4, g), dtype=np.float64)
        g = torch.Generator().manual_seed(seed)  # replay the draws: order, then one factor per step
        order = torch.randperm(3, generator=g).tolist()
        x = rgb.astype(np.float64)
        for i in order:
            f = 0.6 + 0.8 * torch.rand((), generator=g).item()
            assert 0.6 <= f <= 1.4
            grey = x @ np.array([0.299, 0.587, 0.114])
            other = {0: np.zeros_like(x), 1: np.full_like(x, np.round(grey.mean())), 2: grey[..., None]}[i]
            x = np.clip(np.round(other + f * (x - other)), 0, 255)
        assert np.abs(out - x).max() <= 3, (seed, order)
        assert np.abs(out - rgb).max() > 10  # it did change the image


def _png(seed):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_image_collate_masks_every_image_exactly():
    g = torch.Generator().manual_seed(0)
    masks = BlockMasks2d((8, 8), num_masked=39, min_block=4, max_block=None, min_aspect=0.3, top_up=True)
    batch = image_collate([torch.randn(3, 32, 32) for _ in range(5)], [0, 1, 2, 3, 4], list("abcde"), masks=masks,
                          num_patches=64, g=g)
    assert batch.source.shape == (5, 3, 32, 32) and batch.mask.shape == (5, 1, 64) and (batch.mask.sum(-1) == 39).all()
    assert batch.extras["labels"].tolist() == [0, 1, 2, 3, 4]


def test_prepare_text_trains_sentencepiece_with_roberta_ids_and_packs_blocks(tmp_path):
    corpus = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over the lazy dog while python parses every source file".split()
    rng = np.random.default_rng(0)
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(300)))
    meta = prepare_text(str(corpus), str(tmp_path / "shards"), vocab_size=60, block_size=32, samples_per_shard=50)
    assert (meta["bos_id"], meta["pad_id"], meta["eos_id"], meta["unk_id"]) == (0, 1, 2, 3)
    # A corpus this small supports fewer pieces than asked for; the real size is what is recorded.
    assert meta["mask_id"] == meta["vocab_size"] - 1 and meta["vocab_size"] <= 60
    tok = Tokenizer(str(tmp_path / "shards" / "spm.model"))
    assert tok.info.vocab_size == meta["vocab_size"] and max(tok.encode("the lazy dog")) < meta["mask_id"]
    assert load_tokenizer_meta(meta["patterns"]["train"])["sha256"] == tok.info.sha256
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("tokens.npy"))
        block = decode_tokens({"tokens.npy": tar.extractfile(member).read()})
    assert block.shape == (32,) and block[0] == 0


def test_pack_blocks_by_hand():
    blocks = pack_blocks([[5, 6, 7], [8]], 4, bos=0, eos=2, pad=1)
    assert blocks.tolist() == [[0, 5, 6, 7], [0, 2, 8, 2]]
    blocks = pack_blocks([[5, 6, 7, 8]], 4, bos=0, eos=2, pad=1)
    assert blocks.tolist() == [[0, 5, 6, 7], [0, 8, 2, 1]]


def test_tokenizer_mismatch_is_a_clear_error():
    cfg = get_preset("text_tiny")
    meta = {"kind": "sentencepiece", "vocab_size": 3000, "pad_id": 1, "bos_id": 0, "eos_id": 2, "unk_id": 3,
            "mask_id": 2999, "block_size": 128}
    with pytest.raises(ValueError, match="model.text.vocab_size=3000"):
        check_tokenizer(meta, cfg.model.text)
    check_tokenizer({**meta, "vocab_size": 2000, "mask_id": 1999}, cfg.model.text)


def test_text_collate_selects_and_masks_but_keeps_the_clean_view():
    tokens = [torch.randint(4, 99, (64,)) for _ in range(8)]
    tokens[3][40:] = 1
    batch = text_collate(tokens, [str(i) for i in range(8)], pad_id=1, masks=TokenSpanMasks(0.35, 4),
                         token_view=TokenView(mask_id=99), g=torch.Generator().manual_seed(0))
    assert torch.equal(batch.source, torch.stack(tokens))
    assert batch.mask.shape == (8, 1, 64)
    selected = batch.mask[:, 0]
    assert (batch.masked_source[selected] == 99).all()
    assert torch.equal(batch.masked_source[~selected], batch.source[~selected])
    assert not (selected & batch.padding_mask).any()


def test_a_bpe_tokenizer_json_with_roberta_ids_is_accepted_and_others_refused(tmp_path):
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6, "<mask>": 7}
    hf = HfTokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    good = tmp_path / "tokenizer.json"
    hf.save(str(good))
    tok = Tokenizer(str(good))
    assert tok.info.kind == "bpe" and tok.info.vocab_size == 8 and tok.info.mask_id == 7
    assert tok.encode("ab a") == [6, 4]
    bad_vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "<mask>": 5}
    bad = HfTokenizer(models.BPE(vocab=bad_vocab, merges=[], unk_token="<unk>"))
    bad.save(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="RoBERTa"):
        Tokenizer(str(tmp_path / "bad.json"))


def test_prepare_text_skips_files_that_are_not_valid_text_and_names_each(tmp_path):
    words = "the quick brown fox jumps over the lazy dog while python parses every source file".split()
    rng = np.random.default_rng(0)
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "good.txt").write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(40)))
    (src / "random.txt").write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    (src / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 50)
    (src / "nul.txt").write_bytes(b"plain words\x00 and a NUL byte\n" * 50)
    meta = prepare_text(str(src), str(tmp_path / "shards"), vocab_size=60, block_size=32, samples_per_shard=50)
    reasons = {os.path.basename(s["path"]): s["reason"] for s in meta["skipped"]}
    assert sorted(reasons) == ["latin1.txt", "nul.txt", "random.txt"]
    assert reasons["latin1.txt"].startswith("not valid utf-8 at byte 3")
    assert "control character '\\x00'" in reasons["nul.txt"]
    assert meta["documents"] == 40  # only good.txt's documents were tokenised
    tok = Tokenizer(str(tmp_path / "shards" / "spm.model"))
    assert "\ufffd" not in "".join(tok._sp.id_to_piece(i) for i in range(tok.info.vocab_size - 1))
    # The same folder read as Latin-1 keeps latin1.txt (and random bytes decode there too; NUL does not).
    meta = prepare_text(str(src), str(tmp_path / "shards"), vocab_size=60, block_size=32, samples_per_shard=50,
                        clean=True, encoding="latin-1")
    assert "latin1.txt" not in {os.path.basename(s["path"]) for s in meta["skipped"]}


def test_prepare_text_refuses_stale_shards_and_cleans_them_on_request(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    rng = np.random.default_rng(1)
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(200)))
    small.write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(30)))
    out = tmp_path / "shards"
    prepare_text(str(big), str(out), vocab_size=30, block_size=32, samples_per_shard=20)
    with pytest.raises(FileExistsError, match="train-000000.tar.*--clean"):
        prepare_text(str(small), str(out), vocab_size=30, block_size=32, samples_per_shard=20)
    meta = prepare_text(str(small), str(out), vocab_size=30, block_size=32, samples_per_shard=20, clean=True)
    listed = json.load(open(out / "lengths.json"))["shards"]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(listed)
    assert sum(len(v) for k, v in listed.items() if k.startswith("train")) == meta["blocks"]["train"]


def test_reading_a_whole_held_out_set_refuses_a_damaged_shard(tmp_path):
    from d2v.data.shards import expand_pattern, iter_samples

    _image_tree(tmp_path / "tree", corrupt=False)
    report = prepare_image(str(tmp_path / "tree"), str(tmp_path / "shards"), samples_per_shard=4, val_fraction=0.2)
    path = expand_pattern(report["patterns"]["train"])[0]
    assert [k for k, _ in iter_samples(path)] == [k for k, _ in json.load(open(tmp_path / "shards" / "lengths.json"))
                                                  ["shards"][os.path.basename(path)]]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: 512 + len(data) // 3])  # cut inside a member's data
    with pytest.raises(ValueError, match=f"shard {path} is damaged after sample"):
        list(iter_samples(path))
