"""EMA teacher (docs/method.md §3.1 step 5): schedule, fp32 update, copies, no gradients."""
import pytest
import torch

from d2v.config import get_preset
from d2v.models import build_model
from d2v.teacher import Teacher, ema_decay


def test_schedule_values():
    args = dict(start=0.999, end=0.9999, anneal_steps=30_000)
    assert ema_decay(0, **args) == pytest.approx(0.999)
    assert ema_decay(15_000, **args) == pytest.approx(0.99945)
    assert ema_decay(30_000, **args) == pytest.approx(0.9999)
    assert ema_decay(60_000, **args) == pytest.approx(0.9999)
    assert ema_decay(5, start=0.99, end=1.0, anneal_steps=0) == 1.0


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(x, torch.full_like(x, float("inf"))) - x).abs()


def _perturb(student):
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_one_update_is_exact_in_fp32_and_copies_are_copies():
    cfg = get_preset("audio_tiny")
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    _perturb(student)
    before = {n: p.detach().double().clone() for n, p in teacher.model.named_parameters()}
    sp = dict(student.named_parameters())
    tau = teacher.update(0)
    assert tau == pytest.approx(cfg.teacher.ema_start)
    for name, t in teacher.model.named_parameters():
        assert t.dtype == torch.float32
        if name in teacher.copy_names:
            assert torch.equal(t, sp[name].detach())
        else:
            src = sp[name].detach().double()
            want = before[name] + (1 - tau) * (src - before[name])
            err = (t.double() - want).abs()
            # One fp32 ulp at the operands' scale: where t ~ -(1-tau)(s-t) the result nears 0
            # and its own ulp is far below the rounding of any fp32 evaluation of t + w(s-t).
            scale = torch.maximum(before[name].abs(), src.abs()).float()
            assert (err <= _ulp(scale).double()).all(), f"{name}: {err.max()}"
    assert teacher.copy_names and all(n.startswith("encoder.pos_conv") for n in teacher.copy_names)
    assert all(n.startswith(("encoder.layer_norm", "encoder.blocks")) for n in teacher.ema_names)


def test_teacher_has_no_cnn_head_or_mask_embedding_and_gets_no_gradient():
    cfg = get_preset("audio_tiny")
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    names = [n for n, _ in teacher.named_parameters()]
    assert names and not any(n.startswith(("model.frontend", "model.head", "model.mask_embedding")) for n in names)
    assert all(not p.requires_grad for p in teacher.parameters())
    feats = student.features(torch.randn(2, 16_000))
    y = teacher.targets(feats.x)
    assert y.shape == feats.x.shape and not y.requires_grad
    loss = (student.head(student.encode(feats.x)) - y).square().mean()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.frontend.conv_layers[0].conv.weight.grad is not None
    teacher.train()
    assert not teacher.model.training  # always eval


def test_ema_stays_fp32_for_a_bf16_student():
    cfg = get_preset("audio_tiny")
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    student.to(torch.bfloat16)
    teacher.bind(student)
    t0 = {n: p.clone() for n, p in teacher.model.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    for step in range(3):
        teacher.update(step)
    for n, p in teacher.model.named_parameters():
        assert p.dtype == torch.float32
    moved = [n for n in teacher.ema_names if not torch.equal(t0[n], dict(teacher.model.named_parameters())[n])]
    assert len(moved) == len(teacher.ema_names)
    y = teacher.targets(student.features(torch.randn(1, 16_000, dtype=torch.bfloat16)).x, compute_dtype=torch.bfloat16)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_tau_one_freezes():
    cfg = get_preset("audio_tiny")
    cfg.teacher.ema_start = cfg.teacher.ema_end = 1.0
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    before = {n: p.clone() for n, p in teacher.model.named_parameters()}
    _perturb(student)
    teacher.update(10)
    for n, p in teacher.model.named_parameters():
        if n in teacher.ema_names:
            assert torch.equal(p, before[n])


def test_misconfigured_scope_is_an_error():
    cfg = get_preset("audio_tiny")
    cfg.teacher.ema_modules = ("encoder.blocks",)
    with pytest.raises(ValueError, match="encoder.layer_norm"):
        Teacher(build_model(cfg), cfg.teacher)
