"""The references' image fine-tuning recipes by name (`finetune.recipe=NAME`, applied before the other
overrides): what each sets in `finetune.image.*` (d2v.finetune.image_config), `optim.*` and `train.*`.

* vision_base_v2, vision_large_v2: data2vec 2.0 (fairseq `examples/data2vec/config/vision/
  finetuning/mae_imagenet_clean.yaml` and `mae_imagenet_large_clean.yaml`, with the defaults of
  `examples/data2vec/models/mae_image_classification.py` and the transforms of
  `examples/data2vec/data/mae_finetuning_image_dataset.py`);
* vision_base_v1, vision_large_v1: data2vec 1.0 (data2vec_vision `beit/README.md`, the ViT-B and ViT-L
  fine-tuning commands, with the defaults of `beit/run_class_finetuning.py`).

Both references count the batch over all GPUs (16 for 2.0; 8 and 16 for 1.0): a recipe sets the per-rank
micro-batch and the global batch, so a run on another number of ranks stops with a message until
train.global_batch_size (and usually optim.lr) are overridden. Update counts come from epochs of
ImageNet-1k's 1,281,167 training images where the reference counts epochs.
"""
from __future__ import annotations

from typing import Any

from d2v.finetune.recipes import RECIPES, Recipe

IMAGENET_TRAIN = 1_281_167
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
V2_SOURCE = ("fairseq examples/data2vec/config/vision/finetuning/{} (+ models/mae_image_classification.py, "
             "data/mae_finetuning_image_dataset.py)")
V1_SOURCE = "data2vec_vision beit/README.md, the {} fine-tuning command (+ beit/run_class_finetuning.py)"


def _train_steps(epochs: int, global_batch: int) -> int:
    return epochs * (IMAGENET_TRAIN // global_batch)


def _common() -> dict[str, Any]:
    """What all four recipes share: timm's Mixup/CutMix, smoothing, RandAugment, erasing, crops, mean pooling."""
    return {"finetune.image.cutmix": 1.0, "finetune.image.mixup_switch_prob": 0.5,
            "finetune.image.label_smoothing": 0.1, "finetune.image.auto_augment": RAND_AUGMENT,
            "finetune.image.erase_prob": 0.25, "finetune.image.train_crop": "random_resized",
            "finetune.image.crop_pct": 224 / 256,  # both references, for inputs of 224
            "finetune.image.fc_norm": True,  # on the mean of the patch outputs: both references pool by mean
            "optim.schedule": "cosine", "optim.eps": 1e-8, "optim.no_decay_1d": True}


def _v2(source: str, *, lr: float, max_steps: int, min_lr: float, layer_decay: float, drop_path: float,
        clip_norm: float) -> Recipe:
    return Recipe("image_cls", V2_SOURCE.format(source), {
        **_common(), "finetune.image.layer_decay": layer_decay, "finetune.image.embeddings_decay": False,
        "finetune.image.drop_path": drop_path, "finetune.image.mixup": 0.7, "finetune.image.mixup_prob": 0.9,
        "finetune.image.head_init_scale": 1.0, "optim.lr": lr, "optim.betas": (0.9, 0.95), "optim.weight_decay": 0.05,
        "optim.min_lr": min_lr, "optim.clip_norm": clip_norm, "optim.warmup_steps": 16_000,
        "train.max_steps": max_steps, "train.micro_batch_size": 32, "train.global_batch_size": 32 * 16})


def _v1(source: str, *, lr: float, micro: int, gpus: int, epochs: int, warmup_epochs: int, drop_path: float,
        weight_decay: float) -> Recipe:
    return Recipe("image_cls", V1_SOURCE.format(source), {
        **_common(), "finetune.image.layer_decay": 0.65, "finetune.image.embeddings_decay": True,
        "finetune.image.drop_path": drop_path, "finetune.image.mixup": 0.8, "finetune.image.mixup_prob": 1.0,
        "finetune.image.head_init_scale": 0.001, "optim.lr": lr, "optim.betas": (0.9, 0.999),
        "optim.weight_decay": weight_decay, "optim.min_lr": 1e-6, "optim.clip_norm": 0.0,
        "optim.warmup_steps": _train_steps(warmup_epochs, micro * gpus),
        "train.max_steps": _train_steps(epochs, micro * gpus),
        "train.micro_batch_size": micro, "train.global_batch_size": micro * gpus})


IMAGE_RECIPES = {
    "vision_base_v2": _v2("mae_imagenet_clean.yaml", lr=1e-3, max_steps=250_200, min_lr=1e-6, layer_decay=0.65,
                          drop_path=0.1, clip_norm=0.0),
    "vision_large_v2": _v2("mae_imagenet_large_clean.yaml", lr=5e-4, max_steps=125_200, min_lr=1e-7,
                           layer_decay=0.75, drop_path=0.2, clip_norm=4.0),
    "vision_base_v1": _v1("ViT-B", lr=4e-3, micro=128, gpus=8, epochs=100, warmup_epochs=10, drop_path=0.2,
                          weight_decay=0.0),
    # The ViT-L command leaves --warmup_epochs to $WARMUP: run_class_finetuning.py's default (5) stands in.
    "vision_large_v1": _v1("ViT-L", lr=5e-3, micro=64, gpus=16, epochs=50, warmup_epochs=5, drop_path=0.25,
                           weight_decay=0.05),
}
"""The image recipes, registered with every other task's in d2v.finetune.recipes.RECIPES. The data2vec
version of the model must match the recipe's (checked by the task)."""
for _name, _recipe in IMAGE_RECIPES.items():
    if _name in RECIPES:
        raise ValueError(f"two fine-tuning recipes are named {_name}")
    RECIPES[_name] = _recipe


def recipe_version(name: str) -> int:
    return 2 if name.endswith("_v2") else 1
