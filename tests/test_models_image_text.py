"""Vision (BEiT layout) and text (RoBERTa layout) models on the shared core (docs/method.md §3.2, §8)."""
import pytest
import torch

from d2v.batch import Batch
from d2v.config import get_preset
from d2v.masking import apply_token_mask, block_mask_2d, text_span_mask
from d2v.models import build_model
from d2v.models.text import position_ids
from d2v.task import Data2VecTask
from d2v.teacher import Teacher


def _without_head(model):
    return model.num_parameters() - sum(p.numel() for p in model.head.parameters())


def test_parameter_counts_match_transformers():
    image = build_model(get_preset("image_base"))
    assert 85_000_000 <= image.num_parameters() <= 87_000_000
    assert abs(_without_head(image) - 85.66e6) < 0.02e6
    text = build_model(get_preset("text_base"))
    assert 120_000_000 <= text.num_parameters() <= 130_000_000
    assert abs(_without_head(text) - 124.06e6) < 0.01e6


def test_vision_layout():
    model = build_model(get_preset("image_base"))
    names = dict(model.named_parameters())
    assert "encoder.blocks.0.attention.k_proj.bias" not in names
    assert "encoder.blocks.0.attention.q_proj.bias" in names and "encoder.blocks.0.attention.v_proj.bias" in names
    assert names["encoder.rel_pos_bias.table"].shape == (732, 12)
    assert names["encoder.blocks.0.layer_scale_1.weight"].shape == (768,)
    assert float(names["encoder.blocks.0.layer_scale_1.weight"][0].detach()) == pytest.approx(1e-4)
    assert model.encoder.blocks[0].attention_norm.eps == 1e-6 and model.encoder.blocks[0].layer_norm_first
    assert [round(b.drop_path, 4) for b in model.encoder.blocks][-1] == 0.25


def test_text_positions_count_from_pad():
    tokens = torch.tensor([[0, 5, 6, 2, 1, 1]])
    assert position_ids(tokens, 1).tolist() == [[2, 3, 4, 5, 1, 1]]
    model = build_model(get_preset("text_base"))
    assert model.frontend.position_embeddings.num_embeddings == 514
    with pytest.raises(ValueError, match="vocab_size"):
        model.features(torch.tensor([[0, 50_265]]))


def test_image_teacher_averages_everything_and_uses_block_ends():
    cfg = get_preset("image_tiny")
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    assert not teacher.copy_names
    assert any(n.startswith("frontend") for n in teacher.ema_names)
    assert "encoder.cls_token.weight" in teacher.ema_names and "encoder.rel_pos_bias.table" in teacher.ema_names
    images = torch.randn(2, 3, 32, 32)
    seen = []
    teacher.model(images, tap=lambda i, out: seen.append(out.x))
    from d2v.kernels.targets_reference import fused_targets as build_targets

    want = build_targets(seen, top_k=3, layer_norm="layer", final_norm="layer")
    assert seen[0].shape == (2, 64, 64)  # CLS removed from the taps
    assert torch.allclose(teacher.targets(images), want, atol=1e-5)


def test_text_teacher_sees_the_clean_tokens():
    cfg = get_preset("text_tiny")
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    tokens = torch.randint(4, 1999, (3, 128))
    tokens[2, 90:] = 1
    pad = tokens == 1
    sel = text_span_mask(3, 128, padding_mask=pad, generator=torch.Generator().manual_seed(0))
    masked = apply_token_mask(tokens, sel, mask_id=1999)
    seen = {}
    original = teacher.targets

    def spy(x, padding, **kw):
        seen["x"], seen["padding"] = x, padding
        return original(x, padding, **kw)

    teacher.targets = spy
    task = Data2VecTask(student, teacher, cfg)
    out = task(Batch(source=tokens, mask=sel, masked_source=masked))
    student.eval()
    clean = student.features(tokens).x
    assert torch.allclose(seen["x"], clean, atol=1e-6)
    assert torch.equal(seen["padding"], pad)
    assert out.num_targets == int(sel.sum()) and torch.isfinite(out.loss)


def test_image_task_runs_with_mean_smooth_l1():
    cfg = get_preset("image_tiny")
    student = build_model(cfg)
    task = Data2VecTask(student, Teacher(student, cfg.teacher), cfg)
    mask = block_mask_2d(2, (8, 8), num_masked=39, min_block=4, generator=torch.Generator().manual_seed(0))
    out = task(Batch(source=torch.randn(2, 3, 32, 32), mask=mask))
    assert out.metrics["loss_count"] == 2 * 39 * 64  # mean over all elements of the masked patches
    out.loss.backward()
    assert student.mask_embedding.weight.grad is not None and student.encoder.cls_token.weight.grad is not None
