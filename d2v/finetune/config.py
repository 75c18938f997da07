"""The fine-tuning config: the pretrained model's section plus optimizer, loop and task settings,
in the same typed tree and `key=value` override syntax as pretraining (resolved by
d2v.finetune.resolve), and where the model section of a pretrained run is read from.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from d2v.config.overrides import from_dict
from d2v.config.schema import D2vConfig, ModelConfig, OptimConfig, TrainConfig
from d2v.finetune.image_config import ImageFinetuneConfig


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
    recipe: str = ""
    """A reference recipe of the task by name (image_cls: d2v.finetune.image_recipes.RECIPES), applied before
    the other overrides."""
    image: ImageFinetuneConfig = field(default_factory=ImageFinetuneConfig)
    """image_cls: augmentation, mixing, layer-wise LR decay, drop path, pooling."""


@dataclass(kw_only=True)
class FinetuneConfig:
    """A whole fine-tuning run."""

    name: str = "finetune"
    """Preset the model section came from."""
    task: str = "asr"
    """A registered downstream task (d2v.finetune.tasks.TASKS): asr (CTC on characters) | image_cls | text_cls."""
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
