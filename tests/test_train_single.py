"""A single-process DeepSpeed run of audio_tiny on synthetic speech-like data (docs/method.md §3.1, §4)."""
import os

import pytest
import torch

from d2v.config import load_template, resolve
from d2v.data.synthetic import synthetic_batches_for
from d2v.task import Data2VecTask
from d2v.teacher import Teacher
from d2v.models import build_model

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fit(trainer, batches):
    """Updates until train.max_steps, as the run loop makes them (without its streams and sinks)."""
    history = []
    while trainer.step < trainer.cfg.train.max_steps:
        history.append(trainer.train_step([next(batches) for _ in range(trainer.cfg.train.grad_accum)]))
    return history


@pytest.fixture(scope="module")
def bf16_history():
    from d2v.train.trainer import Trainer

    torch.set_num_threads(2)
    cfg = resolve("audio_tiny", overrides=["train.max_steps=120"])
    trainer = Trainer(cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")))
    assert next(trainer.student.parameters()).dtype == torch.bfloat16
    history = _fit(trainer, synthetic_batches_for(cfg))
    return cfg, trainer, history


def test_loss_falls_and_targets_do_not_collapse(bf16_history):
    cfg, trainer, history = bf16_history
    losses = [h.loss for h in history]
    assert len(losses) == 120
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first, (first, last)
    assert min(h.values["target_std"] for h in history) > cfg.loss.min_target_std


def test_ema_is_updated_after_every_step_and_stays_fp32(bf16_history):
    cfg, trainer, history = bf16_history
    taus = [h.values["ema_decay"] for h in history]
    assert taus[0] == pytest.approx(cfg.teacher.ema_start)
    assert all(b > a for a, b in zip(taus, taus[1:]))
    assert all(p.dtype == torch.float32 for p in trainer.teacher.parameters())
    sp = dict(trainer.student.named_parameters())
    for name, t in trainer.teacher.model.named_parameters():
        if name in trainer.teacher.copy_names:
            assert torch.equal(t, sp[name].float())
        else:  # a moving average of the student: close to it but not equal
            assert not torch.equal(t, sp[name].float())


def test_fp32_engine_step_matches_a_manual_step():
    """The task's loss and one fp32 update equal a plain-PyTorch computation of the same step."""
    from d2v.train.trainer import Trainer

    cfg = resolve("audio_tiny", overrides=["train.precision=fp32", "model.dropout=0", "model.attention_dropout=0",
                                           "optim.schedule=constant", "optim.clip_norm=0"])
    torch.manual_seed(0)
    student = build_model(cfg)
    manual = build_model(cfg)
    manual.load_state_dict(student.state_dict())
    trainer = Trainer(cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), student=student)
    batch = next(synthetic_batches_for(cfg))
    teacher = Teacher(manual, cfg.teacher)
    out = Data2VecTask(manual, teacher, cfg)(batch)
    opt = torch.optim.AdamW(manual.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    out.loss.backward()
    opt.step()
    metrics = trainer.train_step([batch])
    assert metrics.loss == pytest.approx(float(out.loss.detach()), rel=1e-5)
    for (n, a), b in zip(trainer.student.named_parameters(), manual.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = resolve("audio_tiny", overrides=["model.dropout=0.1", "model.attention_dropout=0.1"])
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = next(synthetic_batches_for(cfg))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.encoder.checkpoint_blocks = ckpt
        teacher = Teacher(model, cfg.teacher)
        torch.manual_seed(1)  # same dropout draws; non-reentrant checkpointing replays them
        Data2VecTask(model, teacher, cfg)(batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("supported", [False, True])
def test_fp16_follows_what_the_accelerator_supports(monkeypatch, supported):
    """DeepSpeed's CPU accelerator reports fp16 where the CPU has AVX512-FP16 (Sapphire Rapids):
    the decision follows that report, so both outcomes are forced here on any CPU."""
    from deepspeed.accelerator import get_accelerator

    from d2v.train.trainer import Trainer

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: supported)
    cfg = resolve("audio_tiny", overrides=["train.precision=fp16", "train.max_steps=2"])
    template = load_template(os.path.join(ROOT, "ds_configs", "cpu.json"))
    if not supported:
        with pytest.raises(ValueError, match="bf16"):
            Trainer(cfg, template)
        return
    trainer = Trainer(cfg, template)
    assert next(trainer.student.parameters()).dtype == torch.float16
    m = trainer.train_step([next(synthetic_batches_for(cfg))])
    assert m.loss == m.loss and trainer.step in (0, 1)  # a finite loss; fp16's first step may be a skip


def test_layerdrop_is_drawn_per_micro_batch_and_the_trainer_numbers_them():
    """fairseq draws LayerDrop per forward: the micro-batches of one accumulated update drop different
    blocks (still the same on every rank: the seed is a function of seed, update and micro index only)."""
    from d2v.models.encoder import layerdrop_kept
    from d2v.task import layer_seed
    from d2v.train.trainer import Trainer

    seeds = [layer_seed(1, 7, i) for i in range(4)]
    assert len({s % 2**32 for s in seeds}) == 4  # torch seeds a CPU generator from the low 32 bits
    assert seeds[0] == layer_seed(1, 7) == layer_seed(1, 7, 0)
    kept = [[layerdrop_kept(12, 0.5, layer_seed(1, step, i)) for i in range(2)] for step in range(4)]
    assert all(a != b for a, b in kept)
    cfg = resolve("audio_tiny", overrides=["train.grad_accum=2", "model.layerdrop=0.5", "train.max_steps=1"])
    trainer = Trainer(cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")))
    calls, task = [], trainer.task

    def recording(batch, **kw):
        calls.append(kw)
        return task(batch, **kw)

    trainer.task = recording
    _fit(trainer, synthetic_batches_for(cfg))
    assert calls == [{"step": 0, "micro": 0}, {"step": 0, "micro": 1}]


def test_logged_flops_count_only_the_blocks_layerdrop_ran():
    """The MFU's FLOPs: a block LayerDrop skipped did no work (forward and backward: 3 forwards
    of that block); the teacher still runs every block."""
    from d2v.estimate.flops import flops_per_sample
    from d2v.models.encoder import layerdrop_kept
    from d2v.task import layer_seed
    from d2v.train.trainer import Trainer

    cfg = resolve("audio_tiny", overrides=["model.layerdrop=0.5", "train.max_steps=8", "train.micro_batch_size=2"])
    trainer = Trainer(cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")))
    batches = synthetic_batches_for(cfg)
    ran = []
    for step in range(8):
        batch = next(batches)
        m = trainer.train_step([batch])
        count = flops_per_sample(cfg, batch.source.shape[1] / cfg.model.audio.sample_rate)
        blocks = len(layerdrop_kept(cfg.model.depth, 0.5, layer_seed(cfg.train.seed, step)))
        ran.append(blocks)
        # float64 by hand: every student block forward costs count.blocks / depth
        want = 2 * (count.train_step - 3 * count.blocks * (cfg.model.depth - blocks) / cfg.model.depth)
        assert m.values["flops"] == pytest.approx(want, rel=1e-12), (step, blocks)
    assert min(ran) < cfg.model.depth  # LayerDrop skipped blocks in some update