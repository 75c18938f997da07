"""The fine-tuning config: the pretrained model's section plus optimizer, loop and task settings,
in the same typed tree and `key=value` override syntax as pretraining.

The model section comes from the checkpoint or export that initialises the run (or a preset for
a random-init run without one); task defaults follow fairseq's wav2vec 2.0 / data2vec fine-tuning
recipes scaled to the tiny demo models (tri-stage LR 10/40/50 %), then the overrides apply.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from d2v.config.overrides import apply_overrides, from_dict
from d2v.config.presets import get_preset
from d2v.config.schema import D2vConfig, ModelConfig, OptimConfig, TrainConfig

TASK_MODALITY = {"asr": "audio", "image_cls": "image", "text_cls": "text"}


@dataclass(kw_only=True)
class TaskConfig:
    """What is fine-tuned on which data."""

    train_data: str = ""
    """asr: transcribed shard pattern | image_cls: ImageFolder root | text_cls: TSV file (text<TAB>label)."""
    eval_data: str = ""
    """Held-out data in the same form (asr: the held-out voices)."""
    tokenizer: str = ""
    """text_cls: SentencePiece .model or tokenizer.json (default: the one beside the pretraining shards)."""
    freeze_feature_encoder: bool = True
    """asr: no gradient into the conv waveform encoder (fairseq's feature_grad_mult=0); its projection still trains."""
    freeze_encoder_steps: int = 0
    """Updates at the start during which only the task head trains (fairseq's freeze_finetune_updates)."""
    head_dropout: float = 0.0
    """Dropout on the encoder output before the task head (fairseq's final_dropout)."""
    normalize_audio: bool = True
    """asr: zero mean, unit variance per utterance (as in pretraining)."""
    eval_batch_size: int = 32
    """Examples per rank per evaluation batch."""
    eval_every: int = 0
    """Updates between evaluations (0: only at the end)."""


@dataclass(kw_only=True)
class FinetuneConfig:
    """A whole fine-tuning run."""

    name: str = "finetune"
    """Preset the model section came from."""
    task: str = "asr"
    """asr (CTC on characters) | image_cls | text_cls."""
    init: str = ""
    """Checkpoint or export directory the encoder was initialised from (empty: random initialisation)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The encoder (from the pretrained run; structural fields must not change)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop (max_steps, micro_batch_size, precision, seed, out_dir, log_every)."""
    finetune: TaskConfig = field(default_factory=TaskConfig)
    """Task data and freezing."""


def is_transformers_dir(path: str) -> bool:
    """A transformers-format directory (`export --format hf`, or public data2vec weights on disk)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return "model_type" in json.load(f)


def read_pretrain_config(path: str) -> D2vConfig:
    """The D2vConfig of an export directory (config.json) or a d2v checkpoint (any of run dir,
    checkpoints dir, tag dir)."""
    if os.path.exists(os.path.join(path, "student.safetensors")):
        with open(os.path.join(path, "config.json")) as f:
            return from_dict(json.load(f))
    if is_transformers_dir(path):
        from d2v.interop import pretrained_config

        return pretrained_config(path)
    from d2v.export import resolve_tag_dir

    with open(os.path.join(resolve_tag_dir(path), "d2v_state.json")) as f:
        return from_dict(json.load(f)["config"])


def task_defaults(task: str, base: D2vConfig) -> tuple[OptimConfig, TrainConfig]:
    o = OptimConfig(lr=5e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0, schedule="tri_stage",
                    phase_ratios=(0.1, 0.4, 0.5), init_lr_scale=0.01, final_lr_scale=0.05, clip_norm=1.0)
    t = TrainConfig(max_steps=300, micro_batch_size=8, precision=base.train.precision, seed=1, log_every=25,
                    save_every=0, threads=base.train.threads)
    if task == "image_cls":
        o.lr, o.weight_decay, o.no_decay_1d = 1e-3, 0.05, True
        t.micro_batch_size = 32
    elif task == "text_cls":
        o.lr, o.weight_decay = 3e-4, 0.01
        t.micro_batch_size = 16
    return o, t


def resolve_finetune(task: str, *, init: str | None = None, preset: str | None = None,
                     overrides: list[str] | tuple[str, ...] = ()) -> tuple[FinetuneConfig, D2vConfig]:
    """(fine-tuning config, the pretraining config it started from), validated."""
    if task not in TASK_MODALITY:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(TASK_MODALITY)}")
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
    if task == "text_cls" and base.data.train_shards:
        from d2v.data.text import load_tokenizer_meta

        try:
            meta = load_tokenizer_meta(base.data.train_shards)
            cfg.finetune.tokenizer = os.path.join(os.path.dirname(base.data.train_shards.split("{")[0]), meta["file"])
        except FileNotFoundError:
            pass  # the pretraining shards are elsewhere: finetune.tokenizer must be given
    structural = dataclasses.asdict(cfg.model)
    apply_overrides(cfg, overrides)
    changed = [k for k in ("modality", "embed_dim", "depth", "num_heads", "ffn_dim") if
               structural[k] != getattr(cfg.model, k)]
    if changed and init:
        raise ValueError(f"model.{changed[0]} cannot change when fine-tuning {init}: the weights fix it")
    validate(cfg)
    return cfg, base


def validate(cfg: FinetuneConfig) -> None:
    problems = []
    want = TASK_MODALITY[cfg.task]
    if cfg.model.modality != want:
        problems.append(f"task {cfg.task} needs a {want} model, the encoder is {cfg.model.modality}; "
                        f"pick a matching --init or --preset")
    if not cfg.finetune.train_data or not cfg.finetune.eval_data:
        problems.append("give the data: --train-data and --eval-data "
                        "(or finetune.train_data=... finetune.eval_data=...)")
    if cfg.task == "text_cls" and not cfg.finetune.tokenizer:
        problems.append("text_cls needs the pretraining tokenizer: --tokenizer FILE (finetune.tokenizer)")
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
