"""Shared by the 2-rank ZeRO equivalence launch and the single-process references in tests."""
from __future__ import annotations

from d2v.batch import Batch
from d2v.config import resolve
from d2v.data.synthetic import synthetic_batch

PRESETS = ("audio_tiny", "image_tiny", "text_tiny")
PRECISIONS = ("fp32", "bf16")
STEPS = 10  # past the 5 warm-up steps; every case and both precisions keep their checks
MICRO = 2  # per rank; the single-process reference runs 2 x MICRO
# case -> (DeepSpeed template, zero_optimization overrides, teacher offloaded)
CASES = {
    "zero1": ("zero1.json", {}, False),
    "zero2": ("zero2.json", {}, False),
    "zero3_thr0": ("zero3.json", {"stage3_param_persistence_threshold": 0}, False),
    "zero3_default": ("zero3.json", {}, False),
    "zero1_offload": ("zero1.json", {}, True),
    "zero3_thr0_offload": ("zero3.json", {"stage3_param_persistence_threshold": 0}, True),
}


def equivalence_config(preset: str, precision: str, offload: bool, micro: int = MICRO, grad_accum: int = 1):
    """Deterministic: dropout, drop path and LayerDrop off; clipping active (grad norms are > 1)."""
    overrides = [
        f"train.precision={precision}", f"train.micro_batch_size={micro}", f"train.grad_accum={grad_accum}",
        f"train.max_steps={STEPS}", "model.dropout=0", "model.attention_dropout=0", "model.activation_dropout=0",
        "model.feature_dropout=0", "model.layerdrop=0", "optim.clip_norm=1.0", "optim.warmup_steps=5",
        f"teacher.offload={'cpu' if offload else 'none'}",
    ]
    if preset.startswith("image"):
        overrides.append("model.image.drop_path=0")
    return resolve(preset, overrides=overrides)


def global_batch(cfg, size: int, step: int) -> Batch:
    """The same global batch for every split: masks are precomputed here, not per rank."""
    return synthetic_batch(cfg, size, seed=1234, index=step)


def count_units(cfg, batch: Batch) -> int:
    """The loss's normalising count for a batch (masked positions, times D for a mean loss)."""
    n = int(batch.mask.sum())
    return n * cfg.model.embed_dim if cfg.loss.reduction == "mean" else n


def run_reference(preset: str, precision: str, template: dict, *, accumulate: bool):
    """One process: micro-batch 2b, or two accumulated micro-batches of b whose losses are
    normalised by the window's count (so only the reduction order differs)."""
    from d2v.train.trainer import Trainer

    cfg = equivalence_config(preset, precision, False, micro=MICRO if accumulate else 2 * MICRO,
                             grad_accum=2 if accumulate else 1)
    cfg.train.seed = 1
    trainer = Trainer(cfg, template)
    losses = []
    for step in range(STEPS):
        g = global_batch(cfg, 2 * MICRO, step)
        micro = [g.rows(0, MICRO), g.rows(MICRO, 2 * MICRO)] if accumulate else [g]
        window = count_units(cfg, g)
        trainer.task.normalizer = lambda count, n=window, a=len(micro): n / a
        m = trainer.train_step(micro)
        # train_step averages metrics over micro-batches: undo that for the window totals.
        losses.append(m.values["loss_sum"] / m.values["loss_count"])
    state = {k: v.clone() for k, v in trainer.teacher.export_state().items()}
    return losses, state


def relative_teacher_diff(a: dict, b: dict) -> float:

    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return (num / den) ** 0.5


def max_relative_loss_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
