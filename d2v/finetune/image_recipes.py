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

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from d2v.finetune.config import FinetuneConfig
    from d2v.finetune.image_config import ImageFinetuneConfig

IMAGENET_TRAIN = 1_281_167
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


def _train_steps(epochs: int, global_batch: int) -> int:
    return epochs * (IMAGENET_TRAIN // global_batch)


def _common(cfg: "FinetuneConfig") -> "ImageFinetuneConfig":
    """What all four recipes share: timm's Mixup/CutMix, smoothing, RandAugment, erasing, crops, mean pooling."""
    im = cfg.finetune.image
    im.cutmix, im.mixup_switch_prob, im.label_smoothing = 1.0, 0.5, 0.1
    im.auto_augment, im.erase_prob, im.train_crop = RAND_AUGMENT, 0.25, "random_resized"
    im.crop_pct = 224 / 256  # both references, for inputs of 224
    im.fc_norm = True  # on the mean of the patch outputs: both references pool by mean
    o = cfg.optim
    o.schedule, o.eps, o.no_decay_1d = "cosine", 1e-8, True
    return im


def _v2(cfg: "FinetuneConfig", *, lr: float, max_steps: int, min_lr: float, layer_decay: float, drop_path: float,
        clip_norm: float) -> None:
    im = _common(cfg)
    im.layer_decay, im.embeddings_decay, im.drop_path = layer_decay, False, drop_path
    im.mixup, im.mixup_prob, im.head_init_scale = 0.7, 0.9, 1.0
    o = cfg.optim
    o.lr, o.betas, o.weight_decay, o.min_lr, o.clip_norm = lr, (0.9, 0.95), 0.05, min_lr, clip_norm
    o.warmup_steps = 16_000
    cfg.train.max_steps, cfg.train.micro_batch_size, cfg.train.global_batch_size = max_steps, 32, 32 * 16


def _v1(cfg: "FinetuneConfig", *, lr: float, micro: int, gpus: int, epochs: int, warmup_epochs: int,
        drop_path: float, weight_decay: float) -> None:
    im = _common(cfg)
    im.layer_decay, im.embeddings_decay, im.drop_path = 0.65, True, drop_path
    im.mixup, im.mixup_prob, im.head_init_scale = 0.8, 1.0, 0.001
    o = cfg.optim
    o.lr, o.betas, o.weight_decay, o.min_lr, o.clip_norm = lr, (0.9, 0.999), weight_decay, 1e-6, 0.0
    o.warmup_steps = _train_steps(warmup_epochs, micro * gpus)
    cfg.train.max_steps = _train_steps(epochs, micro * gpus)
    cfg.train.micro_batch_size, cfg.train.global_batch_size = micro, micro * gpus


RECIPES: dict[str, Callable[["FinetuneConfig"], None]] = {
    "vision_base_v2": lambda cfg: _v2(cfg, lr=1e-3, max_steps=250_200, min_lr=1e-6, layer_decay=0.65,
                                      drop_path=0.1, clip_norm=0.0),
    "vision_large_v2": lambda cfg: _v2(cfg, lr=5e-4, max_steps=125_200, min_lr=1e-7, layer_decay=0.75,
                                       drop_path=0.2, clip_norm=4.0),
    "vision_base_v1": lambda cfg: _v1(cfg, lr=4e-3, micro=128, gpus=8, epochs=100, warmup_epochs=10,
                                      drop_path=0.2, weight_decay=0.0),
    # The ViT-L command leaves --warmup_epochs to $WARMUP: run_class_finetuning.py's default (5) stands in.
    "vision_large_v1": lambda cfg: _v1(cfg, lr=5e-3, micro=64, gpus=16, epochs=50, warmup_epochs=5,
                                       drop_path=0.25, weight_decay=0.05),
}
"""Recipe name -> what it sets. The data2vec version of the model must match the recipe's (checked)."""


def recipe_version(name: str) -> int:
    return 2 if name.endswith("_v2") else 1
