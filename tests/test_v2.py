"""data2vec 2.0 (docs/method.md §3.3): masks made in collate, the kept-token student, decoders, the
once-per-sample teacher, the task's loss, FLOPs, presets and config checks."""
import math

import numpy as np
import pytest
import torch

from d2v.config import apply_overrides, get_preset
from d2v.masking.multimask import MultiMaskFn, multi_mask_fn
from d2v.data.synthetic import synthetic_batch
from d2v.models import build_model
from d2v.models.decoders import ConvDecoder, fill_masked
from d2v.batch import kept_positions as kept_indices
from d2v.models.positions import sincos_2d
from d2v.task import Data2VecTask, clone_targets
from d2v.teacher import Teacher

MODALITIES = ("audio", "image", "text")


def tiny(modality: str, *overrides: str):
    return apply_overrides(get_preset(f"{modality}_tiny_v2"), list(overrides)).validate()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- masks --------------------------------------------------------------------------------------

def test_collate_masks_have_exact_counts_per_row_for_every_modality():
    from d2v.data.audio import collate_audio
    from d2v.data.image import image_collate
    from d2v.data.text import text_collate
    from d2v.masking.makers import mask_maker

    # audio: 1-D blocks, exactly floor(0.5·T) masked in every one of the B·M rows
    cfg = get_preset("audio_base_v2")
    waves = [np.random.default_rng(i).standard_normal(16_000 + 800 * i).astype(np.float32) for i in range(3)]
    batch = collate_audio(waves, ["a", "b", "c"], pad=False, max_sample_size=320_000,
                          mask_fn=mask_maker(cfg), generator=gen(0), conv_layers=cfg.model.audio.conv_layers)
    assert batch.mask.shape == (3, 8, 49)
    assert (batch.mask.sum(-1) == 24).all()
    # image: inverse 3x3 blocks keep exactly 39 of 196 patches (157 masked)
    cfg = get_preset("image_base_v2")
    images = [torch.zeros(3, 224, 224) for _ in range(2)]
    batch = image_collate(images, [0, 1], ["x", "y"], masks=mask_maker(cfg), num_patches=196, g=gen(0))
    assert batch.mask.shape == (2, 16, 196)
    assert ((~batch.mask).sum(-1) == 39).all()
    # text: random 48%, kept int(T·0.52) per row, real tokens kept before padding
    cfg = get_preset("text_base_v2")
    blocks = [torch.arange(4, 104), torch.cat([torch.arange(4, 64), torch.full((40,), 1)])]
    batch = text_collate(blocks, ["p", "q"], pad_id=1, masks=mask_maker(cfg), token_view=None, g=gen(0))
    assert batch.mask.shape == (2, 8, 100) and batch.masked_source is None
    assert ((~batch.mask).sum(-1) == 52).all()
    assert not (~batch.mask[1, :, 60:]).any()  # 60 real tokens >= 52 kept: no pad is kept


def test_masks_are_reproducible_from_the_seed_and_differ_between_clones():
    for kind, length, grid in (("block_1d", 200, None), ("inverse_block_2d", 196, (14, 14)), ("random", 128, None)):
        fn = MultiMaskFn(kind, 4, 0.5, 3, 0.05, grid)
        a, b, c = fn(3, length, None, gen(7)), fn(3, length, None, gen(7)), fn(3, length, None, gen(8))
        assert torch.equal(a, b) and not torch.equal(a, c), kind
        assert not torch.equal(a[0, 0], a[0, 1]), kind  # each clone has its own mask


def test_block_masks_refuse_padded_rows():
    pad = torch.zeros(2, 50, dtype=torch.bool)
    pad[1, 40:] = True
    with pytest.raises(ValueError, match="data.pad=false"):
        MultiMaskFn("block_1d", 2, 0.5)(2, 50, pad, gen(0))


# -- student --------------------------------------------------------------------------------------

@pytest.mark.parametrize("modality", MODALITIES)
def test_nothing_masked_with_one_clone_equals_the_full_sequence_encoder(modality):
    torch.manual_seed(0)
    cfg = tiny(modality, "model.v2.num_masks=1")
    student = build_model(cfg).eval()
    batch = synthetic_batch(cfg, 2, seed=0, index=0)
    feats = student.features(batch.source, batch.source_lengths)
    mask = torch.zeros(feats.x.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        kept, keep = student.encoder.encode_kept(feats.x, mask, feats.padding_mask)
        full = student.encoder(feats.x, feats.padding_mask)
    assert torch.equal(keep, torch.arange(feats.x.shape[1]).expand_as(keep))
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)


def test_dropping_masked_tokens_equals_attending_around_them():
    """Encoding only the kept frames (ALiBi at their original positions) equals encoding the whole
    sequence with the masked frames as padded keys, read at the kept positions."""
    torch.manual_seed(0)
    cfg = tiny("audio")
    student = build_model(cfg).eval()
    with torch.no_grad():
        student.encoder.alibi.scale.copy_(torch.tensor([0.5, 1.0, 2.0, 0.0]))
    enc = student.encoder
    x = torch.randn(3, 40, 64)
    mask = MultiMaskFn("block_1d", 1, 0.5)(3, 40, None, gen(0))[:, 0]
    with torch.no_grad():
        h, keep = enc.encode_kept(x, mask)
        x_pos = x + enc.pos_conv(x.masked_fill(mask.unsqueeze(-1), 0.0))
        full = enc._run(x_pos, mask, torch.arange(40).expand(3, 40), None, None)
    kept_rows = torch.gather(full, 1, keep.unsqueeze(-1).expand(-1, -1, 64))
    torch.testing.assert_close(h, kept_rows, rtol=1e-4, atol=1e-4)
    assert torch.equal(keep, torch.stack([(~m).nonzero().flatten() for m in mask]))


def test_kept_indices_require_equal_counts():
    mask = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match="same number of tokens"):
        kept_indices(mask)


def test_fill_masked_puts_kept_tokens_back_and_noise_elsewhere():
    x = torch.arange(1, 13, dtype=torch.float32).view(2, 2, 3)
    keep = torch.tensor([[1, 3], [0, 2]])
    torch.manual_seed(0)
    out = fill_masked(x, keep, 4, 0.0)
    want = torch.zeros(2, 4, 3)
    want[0, 1], want[0, 3], want[1, 0], want[1, 2] = x[0, 0], x[0, 1], x[1, 0], x[1, 1]
    assert torch.equal(out, want)
    noisy = fill_masked(torch.zeros(64, 1, 8), torch.zeros(64, 1, dtype=torch.long), 500, 0.01)
    assert abs(float(noisy[:, 1:].std()) - 0.01) < 5e-4 and float(noisy[:, 0].abs().max()) == 0.0


def test_2d_decoder_is_local_on_the_patch_grid():
    dec = ConvDecoder(16, 16, 3, 1, 4, residual=False, projection_layers=1, grid=(6, 6)).eval()
    x = torch.randn(1, 36, 16)
    y = x.clone()
    y[0, 2 * 6 + 2] += 1.0  # patch (2, 2)
    changed = (dec(x) - dec(y)).abs().sum(-1).view(6, 6) > 0
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[1:4, 1:4] = True  # a 3x3 kernel reaches the 8 neighbours and nothing else
    assert torch.equal(changed, want)


def test_sincos_table_hand_values():
    t = sincos_2d((2, 3), 8)  # 2 rows x 3 columns, 2 frequencies per axis and function
    assert t.shape == (6, 8)
    # patch (row 1, col 2): column channels first (sin, sin, cos, cos), then row channels
    assert t[5].tolist() == pytest.approx([math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),
                                          math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)], abs=1e-6)


def test_alibi_scale_is_clamped_learned_and_not_decayed():
    from d2v.train.trainer import param_group_names

    cfg = tiny("audio")
    student = build_model(cfg)
    with torch.no_grad():
        student.encoder.alibi.scale.copy_(torch.tensor([-1.0, 0.5, 1.0, 2.0]))
    assert student.encoder.alibi(None).scale_H.tolist() == [0.0, 0.5, 1.0, 2.0]
    batch = synthetic_batch(cfg, 2, seed=0, index=0)
    student.train()
    out = student(batch.source, batch.mask, batch.source_lengths)
    out.prediction.square().sum().backward()
    grad = student.encoder.alibi.scale.grad
    assert grad is not None and grad[1:].abs().min() > 0 and grad[0] == 0  # clamped head gets none
    decay, no_decay = param_group_names(student, cfg.optim.no_decay_1d)
    assert "encoder.alibi.scale" in no_decay and "encoder.alibi.scale" not in decay


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = tiny("audio", "model.dropout=0", "model.attention_dropout=0", "model.v2.decoder_input_dropout=0",
               "model.v2.mask_noise_std=0")  # deterministic training mode: checkpointing runs in training only
    batch = synthetic_batch(cfg, 2, seed=0, index=0)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        student = build_model(cfg).train()
        student.encoder.checkpoint_blocks = ckpt
        with torch.no_grad():
            student.encoder.alibi.scale.mul_(0.5)
        student(batch.source, batch.mask, batch.source_lengths).prediction.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# -- teacher and task ----------------------------------------------------------------------------

def test_teacher_tracks_what_design_3_3_says():
    names = {m: set(Teacher(build_model(tiny(m)), tiny(m).teacher).ema_names) for m in MODALITIES}
    assert any(n.startswith("encoder.pos_conv.") for n in names["audio"])
    assert "encoder.alibi.scale" in names["audio"] and "encoder.layer_norm.weight" in names["audio"]
    assert not any(n.startswith(("frontend.", "decoder.")) for n in names["audio"] | names["text"])
    assert "frontend.projection.weight" in names["image"] and "encoder.cls_token.weight" in names["image"]
    assert not any(n.startswith("decoder.") for n in names["image"])
    assert all(n.startswith("encoder.blocks.") for n in names["text"])


@pytest.mark.parametrize("modality", MODALITIES)
def test_teacher_runs_once_per_sample_and_loss_matches_per_clone_reference(modality):
    torch.manual_seed(0)
    cfg = tiny(modality)
    student = build_model(cfg).eval()  # no dropout or noise: the reference below sees the same numbers
    teacher = Teacher(student, cfg.teacher)
    batch = synthetic_batch(cfg, 2, seed=1, index=3)
    B, M, T = batch.mask.shape
    calls = []
    teacher.model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    out = Data2VecTask(student, teacher, cfg)(batch)
    assert calls == [B]  # one teacher pass over the B original samples, not B·M

    # Reference: the teacher recomputed on every clone (float64 loss over masked non-padded positions).
    with torch.no_grad():
        feats = student.features(batch.source, batch.source_lengths)
        pad = feats.padding_mask
        inputs = batch.source if cfg.teacher.input == "source" else feats.x
        y = teacher.targets(inputs.repeat_interleave(M, 0), None if pad is None else pad.repeat_interleave(M, 0))
        pred = student(batch.source, batch.mask, batch.source_lengths)
    valid = batch.mask.reshape(B * M, T)
    if pad is not None:
        valid = valid & ~pad.repeat_interleave(M, 0)
    diff = pred.prediction.double() - y[valid].double()
    scale = cfg.loss.scale if cfg.loss.scale is not None else 1 / math.sqrt(cfg.model.embed_dim)
    ref = (diff.square().sum(-1) * scale).sum()
    count = int(valid.sum())
    if cfg.model.v2.cls_loss > 0:
        cls_t = y.double().mean(1)
        ref = ref + cfg.model.v2.cls_loss * count * ((pred.cls.double() - cls_t).square().sum(-1) * scale).sum()
    assert out.num_targets == count
    assert float(out.loss.detach()) == pytest.approx(float(ref / count), rel=1e-4)


def test_clone_targets_index_the_sample_of_each_clone():
    y = torch.arange(2 * 3 * 1, dtype=torch.float32).view(2, 3, 1)  # sample b, position t -> 3b + t
    mask = torch.tensor([[[True, False, False], [False, False, True]], [[False, True, True], [True, False, False]]])
    assert clone_targets(y, mask, None).flatten().tolist() == [0, 2, 4, 5, 3]
    pad = torch.tensor([[False, False, True], [False, False, False]])
    assert clone_targets(y, mask, pad).flatten().tolist() == [0, 4, 5, 3]


# -- accounting and config -----------------------------------------------------------------------

def test_flops_count_kept_tokens_times_m_and_the_teacher_once():
    from d2v.estimate.flops import flops_per_sample, student_tokens_per_sample

    cfg = get_preset("image_tiny_v2")  # 64 patches, 12 kept + CLS, 1 prenet + 3 main blocks of 64, M=4
    f = flops_per_sample(cfg)
    block13 = 8 * 13 * 64 * 64 + 4 * 13 * 64 * 128 + 4 * 13 * 13 * 64
    block65 = 8 * 65 * 64 * 64 + 4 * 65 * 64 * 128 + 4 * 65 * 65 * 64
    patch = 2 * 3 * 16 * 64 * 64
    decoder = 2 * (2 * (64 // 16) * 64 * 9 * 64) + 2 * 64 * 64 * 64  # 2 grouped 3x3 convs + Linear
    assert f.blocks == 4 * 4 * block13
    assert f.head == 4 * decoder
    assert f.teacher_forward == 4 * block65 + patch  # the image teacher runs its own patch embedding
    assert f.feature_encoder == patch
    assert student_tokens_per_sample(cfg, 64) == 4 * 13  # M clones x (12 kept + CLS)
    assert student_tokens_per_sample(get_preset("image_tiny"), 64) == 64


@pytest.mark.parametrize("override, message", [
    (["masking.kind=span"], "does not fit"),
    (["model.v2.alibi=true", "model.v2.cls_token=false", "model.v2.cls_loss=0"], "audio only"),
    (["model.v2.cls_token=false"], "cls_loss"),
    (["model.v2.decoder_groups=5"], "decoder_groups"),
    (["model.layer_norm_first=true"], "post-LN"),
])
def test_v2_contradictions_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_preset("image_tiny_v2"), override).validate()


def test_v2_mask_kinds_need_v2_and_audio_v2_needs_cropping():
    with pytest.raises(ValueError, match="model.v2.enabled=true"):
        apply_overrides(get_preset("audio_tiny"), ["masking.kind=block_1d"]).validate()
    with pytest.raises(ValueError, match="data.pad=false"):
        apply_overrides(get_preset("audio_tiny_v2"), ["data.pad=true"]).validate()


def test_presets_carry_design_3_3_numbers():
    a, i, t = get_preset("audio_base_v2"), get_preset("image_base_v2"), get_preset("text_base_v2")
    assert (a.model.v2.num_masks, i.model.v2.num_masks, t.model.v2.num_masks) == (8, 16, 8)
    assert (a.masking.mask_prob, a.masking.block_width, a.masking.mask_adjust) == (0.5, 5, 0.05)
    assert (i.masking.mask_prob, i.masking.block_width, i.masking.mask_adjust) == (0.8, 3, 0.07)
    assert t.masking.mask_prob == 0.48
    assert (a.model.v2.decoder_layers, a.model.v2.decoder_kernel, a.model.v2.decoder_dim) == (4, 7, 384)
    assert (i.model.v2.decoder_layers, i.model.v2.decoder_kernel, i.model.v2.decoder_dim) == (6, 3, 768)
    assert (t.model.v2.decoder_layers, t.model.v2.decoder_kernel, t.model.v2.decoder_groups) == (5, 9, 1)
    assert (i.model.v2.prenet_depth, i.model.depth, i.teacher.top_k, i.model.v2.cls_loss) == (2, 10, 10, 0.01)
    assert (a.teacher.top_k, t.teacher.top_k, i.teacher.final_norm) == (8, 12, "layer")
    assert (a.teacher.ema_end, a.teacher.ema_anneal_steps, a.optim.lr) == (0.99999, 75_000, 7.5e-4)
    assert (i.optim.betas, i.optim.clip_norm, t.optim.clip_norm, t.loss.scale) == ((0.9, 0.95), 4.0, 1.0, 1.0)
    large = get_preset("audio_large_v2")
    assert (large.model.v2.prenet_depth, large.model.depth, large.model.v2.num_masks, large.teacher.ema_end) == (
        8, 16, 12, 1.0)
    assert all(get_preset(n).optim.no_decay_1d for n in ("audio_base_v2", "image_base_v2", "text_base_v2"))
