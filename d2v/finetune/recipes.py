"""Fine-tuning recipes: a reference's published settings for one downstream task, by name
(`--recipe NAME` or `finetune.recipe=NAME`), applied after the task's defaults and before the
overrides (README, fine-tuning).

Speech recognition: fairseq's `examples/wav2vec/config/finetuning/base_{10m,1h,10h,100h,960h}.yaml`,
which data2vec's README uses for its speech fine-tuning (with `common.user_dir=examples/data2vec`).
Their unset fields are fairseq's defaults (wav2vec2_asr.py: mask_length 10, dropout,
attention_dropout and final_dropout 0; tri_stage_lr_scheduler.py: init_lr_scale 0.01; configs.py:
clip_norm 0, no clipping); `sentence_avg: true` is the CTC loss averaged over utterances.
The batch is max_tokens (3.2M samples) per GPU on 8 GPUs (960h; the others: 2 GPUs with
update_freq 4, the same 8 batches per update): run the recipe on 8 ranks for the reference's batch,
as fine-tuning does not accumulate. Not carried over: fp16 (d2v runs bf16 or fp32); checkpoint and
validation intervals; the files' `task.normalize: false`, which is wav2vec 2.0's: fairseq requires
fine-tuning to normalise as pretraining did (data2vec normalises), and so does d2v
(finetune.normalize_audio stays as pretraining set it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from d2v.config.overrides import set_value


@dataclass(frozen=True)
class Recipe:
    task: str
    source: str
    """The reference file the settings come from."""
    settings: dict[str, Any]
    """Dotted fine-tuning config keys and their values."""


def _wav2vec_ctc(split: str, *, lr: float, max_update: int, mask_prob: float, mask_channel_prob: float,
                 layerdrop: float, freeze_updates: int) -> Recipe:
    return Recipe("asr", f"fairseq examples/wav2vec/config/finetuning/base_{split}.yaml", {
        "optim.lr": lr, "optim.betas": (0.9, 0.98), "optim.eps": 1e-8, "optim.weight_decay": 0.0,
        "optim.schedule": "tri_stage", "optim.phase_ratios": (0.1, 0.4, 0.5), "optim.init_lr_scale": 0.01,
        "optim.final_lr_scale": 0.05, "optim.clip_norm": 0.0, "train.max_steps": max_update,
        "finetune.ctc_reduction": "sentence", "finetune.max_tokens": 3_200_000,
        "finetune.mask_prob": mask_prob, "finetune.mask_length": 10, "finetune.mask_channel_prob": mask_channel_prob,
        "finetune.mask_channel_length": 64, "model.layerdrop": layerdrop, "model.activation_dropout": 0.1,
        "model.dropout": 0.0, "model.attention_dropout": 0.0, "finetune.head_dropout": 0.0,
        "finetune.freeze_feature_encoder": True, "finetune.freeze_encoder_steps": freeze_updates,
        "finetune.letters": "fairseq"})


RECIPES: dict[str, Recipe] = {
    "base_10m": _wav2vec_ctc("10m", lr=5e-5, max_update=13_000, mask_prob=0.65, mask_channel_prob=0.25,
                             layerdrop=0.1, freeze_updates=10_000),
    "base_1h": _wav2vec_ctc("1h", lr=5e-5, max_update=13_000, mask_prob=0.65, mask_channel_prob=0.25,
                            layerdrop=0.1, freeze_updates=10_000),
    "base_10h": _wav2vec_ctc("10h", lr=5e-5, max_update=20_000, mask_prob=0.65, mask_channel_prob=0.5,
                             layerdrop=0.05, freeze_updates=10_000),
    "base_100h": _wav2vec_ctc("100h", lr=3e-5, max_update=80_000, mask_prob=0.65, mask_channel_prob=0.5,
                              layerdrop=0.1, freeze_updates=0),
    "base_960h": _wav2vec_ctc("960h", lr=1e-4, max_update=320_000, mask_prob=0.5, mask_channel_prob=0.1,
                              layerdrop=0.1, freeze_updates=0),
}
"""Every recipe by name."""


def get_recipe(name: str, task: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown fine-tuning recipe {name!r}; use one of {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    if recipe.task != task:
        raise ValueError(f"recipe {name} is for task {recipe.task}, not {task}; pick --task {recipe.task}")
    return recipe


def apply_recipe(cfg, name: str) -> None:
    """Sets the recipe's values on a fine-tuning config being resolved (before the overrides)."""
    recipe = get_recipe(name, cfg.task)
    for key, value in recipe.settings.items():
        set_value(cfg, key, value)
    cfg.finetune.recipe = name
