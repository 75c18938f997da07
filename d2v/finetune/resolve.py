"""The fine-tuning config of one run, resolved: the pretrained model's section (from the
checkpoint or export that initialises it, or a preset), the shared fine-tuning defaults (fairseq's
wav2vec 2.0 / data2vec recipes scaled to the tiny demo models, tri-stage LR 10/40/50 %), the task's
own defaults and settings, then the overrides; validated before anything is built.
"""
from __future__ import annotations

import dataclasses

from d2v.config.overrides import apply_overrides
from d2v.config.presets import get_preset
from d2v.config.schema import D2vConfig, OptimConfig, TrainConfig
from d2v.finetune.config import FinetuneConfig, read_pretrain_config
from d2v.finetune.tasks import task_class


def task_defaults(task: str, base: D2vConfig) -> tuple[OptimConfig, TrainConfig]:
    o = OptimConfig(lr=5e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0, schedule="tri_stage",
                    phase_ratios=(0.1, 0.4, 0.5), init_lr_scale=0.01, final_lr_scale=0.05, clip_norm=1.0)
    t = TrainConfig(max_steps=300, micro_batch_size=8, precision=base.train.precision, seed=1, log_every=25,
                    save_every=0, threads=base.train.threads)
    task_class(task).defaults(o, t)
    return o, t


def resolve_finetune(task: str, *, init: str | None = None, preset: str | None = None,
                     overrides: list[str] | tuple[str, ...] = ()) -> tuple[FinetuneConfig, D2vConfig]:
    """(fine-tuning config, the pretraining config it started from), validated."""
    kind = task_class(task)
    if init:
        base = read_pretrain_config(init)
    elif preset:
        base = get_preset(preset)
    else:
        raise ValueError("give --init CKPT_OR_EXPORT_DIR (with --random-init for its architecture at random "
                         "initialisation) or --preset NAME for a random-init run")
    optim, train = task_defaults(task, base)
    cfg = FinetuneConfig(name=base.name, task=task, init=init or "", model=dataclasses.replace(base.model),
                         optim=optim, train=train)
    cfg.train.out_dir = f"runs/finetune-{task}"
    kind.configure(cfg, base)
    structural = dataclasses.asdict(cfg.model)
    # A recipe sets many fields at once: it goes first so that every other override wins over it.
    recipe = [o for o in overrides if o.startswith("finetune.recipe=")]
    apply_overrides(cfg, recipe)
    if cfg.finetune.recipe:
        kind.apply_recipe(cfg, cfg.finetune.recipe)
    apply_overrides(cfg, [o for o in overrides if o not in recipe])
    changed = [k for k in ("modality", "embed_dim", "depth", "num_heads", "ffn_dim") if
               structural[k] != getattr(cfg.model, k)]
    if changed and init:
        raise ValueError(f"model.{changed[0]} cannot change when fine-tuning {init}: the weights fix it")
    validate(cfg)
    return cfg, base


def validate(cfg: FinetuneConfig) -> None:
    kind = task_class(cfg.task)
    problems = []
    want = kind.modality
    if cfg.model.modality != want:
        problems.append(f"task {cfg.task} needs a {want} model, the encoder is {cfg.model.modality}; "
                        f"pick a matching --init or --preset")
    if not cfg.finetune.train_data or not cfg.finetune.eval_data:
        problems.append("give the data: --train-data and --eval-data "
                        "(or finetune.train_data=... finetune.eval_data=...)")
    problems += kind.check(cfg)
    if cfg.train.precision not in ("bf16", "fp32"):
        problems.append(f"train.precision={cfg.train.precision!r}: fine-tuning runs bf16 or fp32")
    if cfg.train.grad_accum != 1:
        problems.append("train.grad_accum must be 1 for fine-tuning (raise train.micro_batch_size instead)")
    if not 0 <= cfg.finetune.head_dropout < 1:
        problems.append("finetune.head_dropout must be in [0, 1)")
    if cfg.finetune.freeze_encoder_steps < 0 or cfg.train.max_steps < 1:
        problems.append("train.max_steps must be >= 1 and finetune.freeze_encoder_steps >= 0")
    if problems:
        raise ValueError("invalid fine-tuning config:\n  " + "\n  ".join(problems))
