"""Image fine-tuning pieces against hand-computed values (README, fine-tuning): Mixup and CutMix
targets, label smoothing, RandAugment levels, random erasing, the evaluation crop, layer-wise LR
scales, drop path in post-LN blocks, and every recipe against a table typed from the reference files."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from d2v.data.image_finetune import (EvalTransform, TrainTransform, center_crop_box, example_generator, random_erase,
                                     resize_shorter)
from d2v.data.randaugment import OPS, RandAugment
from d2v.finetune.mixup import Mixup, cutmix_box, smooth_one_hot, soft_cross_entropy


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# -- mixing and targets ------------------------------------------------------------------------------
def test_label_smoothing_values_and_loss_match_torch_smoothed_cross_entropy():
    t = smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(t[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    assert torch.allclose(t.sum(1), torch.ones(2))
    logits = torch.randn(2, 4, generator=_g(), dtype=torch.float64)
    want = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0]), label_smoothing=0.1)
    assert torch.allclose(soft_cross_entropy(logits, t.double()).double(), want)


def test_mixup_blends_images_and_labels_by_the_same_lam():
    x = torch.randn(4, 3, 5, 5, generator=_g(), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5, smoothing=0.0, num_classes=3)
    out, targets, lam = mix(x, labels, _g(3))
    assert 0.0 < lam < 1.0
    assert torch.allclose(out[0], lam * x[0] + (1 - lam) * x[3])  # paired with the reversed batch
    assert torch.allclose(targets[0], torch.tensor([lam, 1 - lam, 0.0], dtype=targets.dtype))
    assert torch.allclose(targets[2], torch.tensor([0.0, 1 - lam, lam], dtype=targets.dtype))
    # Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2a + 1)) = 0.0962
    lams = np.array([mix.draw(_g(s))[0] for s in range(3000)])
    assert abs(lams.mean() - 0.5) < 0.02 and abs(lams.var() - 1 / (4 * 2.6)) < 0.01


def test_cutmix_lam_is_the_uncut_area_and_prob_zero_leaves_the_batch():
    x = torch.stack([torch.zeros(3, 10, 10), torch.ones(3, 10, 10)]).double()
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, smoothing=0.1, num_classes=2)
    for seed in range(20):
        out, targets, lam = mix(x, torch.tensor([0, 1]), _g(seed))
        pasted = float(out[0].mean())  # image 0 is zeros: the pasted share of ones
        assert math.isclose(lam, 1 - pasted)
        # smoothed (0.05 / 0.95) then mixed by the area lam
        assert math.isclose(float(targets[0, 0]), 0.95 * lam + 0.05 * (1 - lam), rel_tol=1e-6)
    # a drawn lam of 0.64 cuts int(10 * 0.6) = 6 rows centred on cy, clipped at the border
    for seed in range(20):
        g1, g2 = _g(seed), _g(seed)
        top, bottom, left, right = cutmix_box(10, 10, 0.64, g1)
        cy, cx = int(torch.randint(0, 10, (), generator=g2)), int(torch.randint(0, 10, (), generator=g2))
        assert (top, bottom, left, right) == (max(cy - 3, 0), min(cy + 3, 10), max(cx - 3, 0), min(cx + 3, 10))
    off = Mixup(0.8, 1.0, prob=0.0, switch_prob=0.5, smoothing=0.0, num_classes=2)
    out, targets, lam = off(x, torch.tensor([0, 1]), _g())
    assert lam == 1.0 and torch.equal(out, x) and torch.equal(targets, torch.eye(2))
    with pytest.raises(ValueError, match="even micro-batch"):
        mix(x[:1], torch.tensor([0]), _g())


def test_switch_prob_picks_cutmix_at_its_rate():
    mix = Mixup(0.8, 1.0, prob=1.0, switch_prob=0.25, smoothing=0.0, num_classes=2)
    rate = np.mean([mix.draw(_g(s))[1] for s in range(2000)])
    assert abs(rate - 0.25) < 0.03


# -- image transforms ------------------------------------------------------------------------------
def test_eval_resize_and_center_crop_geometry():
    assert resize_shorter(40, 30, 32) == (42, 32) and resize_shorter(30, 40, 32) == (32, 42)
    assert center_crop_box(42, 32, 16) == (13, 8, 29, 24)
    # 224 / 256 at 224: shorter side 256, the centre 224 (the references' evaluation)
    assert resize_shorter(500, 375, int(224 / (224 / 256))) == (341, 256)
    assert center_crop_box(341, 256, 224) == (58, 16, 282, 240)
    arr = np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3)
    x = EvalTransform(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), crop_pct=0.5)(Image.fromarray(arr))
    want = np.asarray(Image.fromarray(arr).resize((42, 32), Image.BICUBIC), dtype=np.float32)[8:24, 13:29] / 255
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.from_numpy(want).permute(2, 0, 1))


def test_random_erasing_replaces_one_rectangle_within_area_and_aspect_bounds():
    x = torch.full((3, 40, 40), 7.0)
    for seed in range(30):
        y = random_erase(x, _g(seed))
        changed = (y != 7.0).any(0).nonzero()
        h = int(changed[:, 0].max() - changed[:, 0].min() + 1)
        w = int(changed[:, 1].max() - changed[:, 1].min() + 1)
        assert len(changed) == h * w  # one filled rectangle
        assert 0.02 * 1600 - 2 * (h + w) <= h * w <= 1600 / 3 + 2 * (h + w)  # rounding of the sides
        assert 0.3 - 0.1 <= h / w <= 1 / 0.3 + 0.4


def test_train_transform_is_a_function_of_seed_step_and_index():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    t = TrainTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), RandAugment.parse("rand-m9-mstd0.5-inc1"), 0.25)
    a, b = t(img, example_generator(1, 5, 3)), t(img, example_generator(1, 5, 3))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, t(img, example_generator(1, 6, 3)))
    whole = TrainTransform(32, (0.0,) * 3, (1.0,) * 3, scale=None)(img, _g())
    want = np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    assert torch.allclose(whole, torch.from_numpy(want).permute(2, 0, 1))


def test_randaugment_policy_string_and_op_levels():
    assert RandAugment.parse("rand-m9-mstd0.5-inc1") == RandAugment(9.0, 2, 0.5)
    assert RandAugment.parse("rand-n3-m7-inc1") == RandAugment(7.0, 3, 0.0)
    assert RandAugment.parse("") is None
    for bad in ("v0", "rand-mstd0.5-inc1", "rand-m9", "rand-m9-x1-inc1"):
        with pytest.raises(ValueError):
            RandAugment.parse(bad)
    assert len(OPS) == 15
    small = Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8))
    for op in OPS.values():  # every op over the whole magnitude range, on an odd-sized image
        for m in np.linspace(0, 10, 11):
            assert op(small, float(m), _g()).size == (7, 9)
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4, 1))[..., None].repeat(3, 2))
    v = np.arange(256)
    # magnitude 9: posterize to 4 - int(3.6) = 1 bit, solarize above 256 - int(230.4) = 26, add int(99) below 128
    assert np.array_equal(np.asarray(OPS["PosterizeIncreasing"](ramp, 9, _g()))[0, :, 0], v & 0x80)
    assert not np.asarray(OPS["PosterizeIncreasing"](ramp, 10, _g())).any()  # 0 bits kept at the top magnitude
    assert np.array_equal(np.asarray(OPS["PosterizeIncreasing"](ramp, 0, _g()))[0, :, 0], v & 0xF0)
    assert np.array_equal(np.asarray(OPS["SolarizeIncreasing"](ramp, 9, _g()))[0, :, 0], np.where(v >= 26, 255 - v, v))
    assert np.array_equal(np.asarray(OPS["SolarizeAdd"](ramp, 9, _g()))[0, :, 0],
                          np.where(v < 128, np.minimum(v + 99, 255), v))
    # magnitude 10 translates by 0.45 of the width, either way
    line = np.zeros((20, 20, 3), dtype=np.uint8)
    line[:, 10] = 255
    cols = {int(np.argmax(np.asarray(OPS["TranslateXRel"](Image.fromarray(line), 10, _g(s)))[5, :, 0]))
            for s in range(8)}
    assert cols == {1, 19}
    # brightness at magnitude 5: factor 1 ± 0.45
    grey = Image.new("RGB", (4, 4), (100, 100, 100))
    vals = {int(np.asarray(OPS["BrightnessIncreasing"](grey, 5, _g(s)))[0, 0, 0]) for s in range(8)}
    assert vals == {55, 145}


# -- layer-wise LR decay and drop path ---------------------------------------------------------------
def _model(preset):
    from d2v.config.presets import get_preset
    from d2v.finetune.model import FinetuneModel, MeanPoolHead
    from d2v.models import build_model

    torch.manual_seed(0)
    return FinetuneModel(build_model(get_preset(preset)), MeanPoolHead(64, 3))


def _lr_of(groups):
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def test_layer_decay_scales_per_layer_beit_and_data2vec_2():
    from d2v.finetune.layer_decay import layer_decay_groups

    model = _model("image_tiny")  # 4 blocks: embeddings 0, block i -> i + 1, head 5
    lr = _lr_of(layer_decay_groups(model, lr=1.0, weight_decay=0.05, decay=0.5, embeddings_decay=True))
    p = dict(model.named_parameters())
    assert lr[id(p["backbone.frontend.projection.weight"])] == 0.5 ** 5
    assert lr[id(p["backbone.encoder.cls_token.weight"])] == 0.5 ** 5
    for i in range(4):
        assert lr[id(p[f"backbone.encoder.blocks.{i}.ffn.fc1.weight"])] == 0.5 ** (4 - i)
        assert lr[id(p[f"backbone.encoder.blocks.{i}.attention_norm.bias"])] == 0.5 ** (4 - i)
    assert lr[id(p["head.weight"])] == 1.0 and lr[id(p["backbone.encoder.final_norm.weight"])] == 1.0
    assert lr[id(p["backbone.encoder.rel_pos_bias.table"])] == 1.0  # BEiT: the shared bias sits with the head
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, decay=0.5, embeddings_decay=True)
    wd = {id(q): g["weight_decay"] for g in groups for q in g["params"]}
    assert wd[id(p["backbone.encoder.blocks.0.ffn.fc1.weight"])] == 0.05
    assert wd[id(p["backbone.encoder.blocks.0.ffn.fc1.bias"])] == 0.0 and wd[id(p["head.bias"])] == 0.0
    assert wd[id(p["backbone.encoder.cls_token.weight"])] == 0.0  # BEiT's no_weight_decay
    assert sum(len(g["params"]) for g in groups) == len(p) and groups[0]["lr"] == 1.0

    model = _model("image_tiny_v2")  # 1 prenet + 3 blocks; 2.0 leaves the embeddings at the full rate
    lr = _lr_of(layer_decay_groups(model, lr=2.0, weight_decay=0.05, decay=0.5, embeddings_decay=False))
    p = dict(model.named_parameters())
    assert lr[id(p["backbone.frontend.projection.weight"])] == 2.0
    assert lr[id(p["backbone.encoder.prenet.0.ffn.fc1.weight"])] == 2.0 * 0.5 ** 4
    assert [lr[id(p[f"backbone.encoder.blocks.{j}.ffn.fc1.weight"])] for j in range(3)] == [2 * 0.5 ** 3, 0.5, 1.0]


def test_drop_path_rises_linearly_and_drops_post_ln_residual_branches():
    from d2v.finetune.layer_decay import set_drop_path
    from d2v.models.blocks import TransformerBlock

    model = _model("image_tiny_v2")
    assert set_drop_path(model, 0.3) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert model.backbone.encoder.blocks[2].drop_path == pytest.approx(0.3)
    block = TransformerBlock(8, 2, 16, layer_norm_first=False, eps=1e-5, dropout=0.0, attention_dropout=0.0,
                             activation_dropout=0.0, drop_path=1 - 1e-7)
    x = torch.randn(3, 5, 8, generator=_g())
    block.train()
    torch.manual_seed(0)
    out = block(x).x  # both branches dropped for every sample: LN2(LN1(x))
    assert torch.allclose(out, block.ffn_norm(block.attention_norm(x)), atol=1e-6)
    block.eval()
    block_ref = block.drop_path
    block.drop_path = 0.0
    want = block(x).x
    block.drop_path = block_ref
    assert torch.equal(block(x).x, want)  # evaluation ignores drop path


# -- the recipes against the reference files --------------------------------------------------------
# fairseq examples/data2vec/config/vision/finetuning/mae_imagenet_clean.yaml and mae_imagenet_large_clean.yaml with
# the defaults of examples/data2vec/models/mae_image_classification.py (github.com/facebookresearch/fairseq, main,
# d05f43cf1c85679994069773a3c7e9401f37b504); data2vec_vision beit/README.md fine-tuning commands with the defaults
# of beit/run_class_finetuning.py (github.com/facebookresearch/data2vec_vision,
# 6146726a0123d536201b500d7f80b476dcbf6e42).
# Columns: lr, betas, weight decay, warmup updates, min lr, clip, updates, per-GPU batch x GPUs, layer decay,
# embeddings decayed, drop path, mixup, cutmix, mixup prob, smoothing, head init scale.
REFERENCE = {
    "vision_base_v2": (1e-3, (0.9, 0.95), 0.05, 16000, 1e-6, 0.0, 250200, 32, 16, 0.65, False, 0.1, 0.7, 1.0, 0.9,
                       0.1, 1.0),
    "vision_large_v2": (5e-4, (0.9, 0.95), 0.05, 16000, 1e-7, 4.0, 125200, 32, 16, 0.75, False, 0.2, 0.7, 1.0, 0.9,
                        0.1, 1.0),
    # 1.0 counts epochs of 1,281,167 images: 10 of 100 epochs at 1024 -> 12510 of 125100 updates
    "vision_base_v1": (4e-3, (0.9, 0.999), 0.0, 12510, 1e-6, 0.0, 125100, 128, 8, 0.65, True, 0.2, 0.8, 1.0, 1.0,
                       0.1, 0.001),
    # ViT-L: 50 epochs at 64 x 16; its warmup is $WARMUP in the README: run_class_finetuning's default 5 epochs
    "vision_large_v1": (5e-3, (0.9, 0.999), 0.05, 6255, 1e-6, 0.0, 62550, 64, 16, 0.65, True, 0.25, 0.8, 1.0, 1.0,
                        0.1, 0.001),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_recipe_matches_the_reference_table(name):
    from d2v.finetune.resolve import resolve_finetune

    preset = "image_base_v2" if name.endswith("v2") else "image_base"
    cfg, _ = resolve_finetune("image_cls", preset=preset, overrides=[
        f"finetune.recipe={name}", "finetune.train_data=x", "finetune.eval_data=y"])
    o, t, im = cfg.optim, cfg.train, cfg.finetune.image
    got = (o.lr, tuple(o.betas), o.weight_decay, o.warmup_steps, o.min_lr, o.clip_norm, t.max_steps,
           t.micro_batch_size, t.global_batch_size // t.micro_batch_size, im.layer_decay, im.embeddings_decay,
           im.drop_path, im.mixup, im.cutmix, im.mixup_prob, im.label_smoothing, im.head_init_scale)
    assert got == REFERENCE[name]
    # shared by all four: timm's transforms and mixing, cosine schedule, mean pooling with fc_norm
    assert (im.auto_augment, im.erase_prob, im.train_crop, im.mixup_switch_prob) == \
        ("rand-m9-mstd0.5-inc1", 0.25, "random_resized", 0.5)
    assert (im.crop_pct, im.fc_norm, o.schedule, o.eps) == (224 / 256, True, "cosine", 1e-8)


def test_recipe_errors_and_overrides_after_the_recipe():
    from d2v.finetune.resolve import resolve_finetune

    data = ["finetune.train_data=x", "finetune.eval_data=y"]
    cfg, _ = resolve_finetune("image_cls", preset="image_base_v2",
                              overrides=["optim.lr=3e-4", "finetune.recipe=vision_base_v2", *data])
    assert cfg.optim.lr == 3e-4 and cfg.finetune.image.mixup == 0.7  # the override wins wherever it is written
    with pytest.raises(ValueError, match="unknown fine-tuning recipe 'nope'.*vision_base_v1"):
        resolve_finetune("image_cls", preset="image_base", overrides=["finetune.recipe=nope", *data])
    with pytest.raises(ValueError, match="data2vec 2.0's recipe but the model is data2vec 1.0"):
        resolve_finetune("image_cls", preset="image_base", overrides=["finetune.recipe=vision_base_v2", *data])
    with pytest.raises(ValueError, match="even"):
        resolve_finetune("image_cls", preset="image_base",
                         overrides=["finetune.recipe=vision_base_v1", "train.micro_batch_size=3", *data])
    with pytest.raises(ValueError, match="recipe vision_base_v1 is for task image_cls, not text_cls"):
        resolve_finetune("text_cls", preset="text_tiny", overrides=["finetune.recipe=vision_base_v1", *data,
                                                                    "finetune.tokenizer=t"])


def test_image_folder_source_decodes_per_batch_and_names_a_broken_file(tmp_path):
    from d2v.data.image_finetune import ImageFolderSource

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 10), (10, 20, 30) if cls == "a" else (200, 100, 0)).save(tmp_path / cls / "0.png")
    (tmp_path / "b" / "1.png").write_bytes(b"not an image")
    src = ImageFolderSource(str(tmp_path))  # lists only: nothing is decoded yet
    assert (len(src), src.classes, src.labels.tolist()) == (3, ["a", "b"], [0, 1, 1])
    x = src.eval_batch([0, 1], EvalTransform(8, (0.0,) * 3, (1.0,) * 3, crop_pct=1.0))
    assert x.shape == (2, 3, 8, 8) and torch.allclose(x[0, :, 4, 4], torch.tensor([10, 20, 30]) / 255.0)
    with pytest.raises(ValueError, match=r"b/1.png: unreadable image"):
        src.eval_batch([2], EvalTransform(8, (0.0,) * 3, (1.0,) * 3))


def test_make_eval_reports_top5_and_keeps_older_results_without_it(tmp_path):
    from d2v.finetune import evaluate as ev

    run = lambda acc, top5=None: {"metrics": {"accuracy": acc, **({"top5": top5} if top5 is not None else {})}}
    rec = {"pretrained": [run(0.8, 0.99), run(0.82, 1.0)], "random init": [run(0.5, 0.9), run(0.52, 0.92)],
           "probe": {"pretrained": [0.7], "random init": [0.3]}}
    results = {"tasks": {"image_cls": rec}}
    ev.write_results(results, str(tmp_path), 2)
    got = {(r["what"], r["metric"]): r for r in results["rows"]}
    assert got[("digits (fine-tuning)", "top5")]["random init"] == [0.9, 0.92]
    assert "top-5 accuracy" in (tmp_path / "results.md").read_text()
    old = {"tasks": {"image_cls": {**rec, "pretrained": [run(0.8)], "random init": [run(0.5)]}}}
    ev.write_results(old, str(tmp_path), 2)  # a results.json from before top-5 was measured
    assert [r["metric"] for r in old["rows"]] == ["accuracy", "accuracy"]
