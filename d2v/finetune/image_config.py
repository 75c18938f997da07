"""Image fine-tuning settings (`finetune.image.*`). The defaults are the plain run (whole image resized,
no mixing or smoothing, one LR): every technique is off until a recipe (d2v.finetune.image_recipes)
or an override turns it on.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ImageFinetuneConfig:
    """How an image classifier is trained and read out (image_cls)."""

    layer_decay: float = 1.0
    """LR multiplier per layer towards the input (d2v.finetune.layer_decay; 1: one LR for all)."""
    embeddings_decay: bool = True
    """The embeddings get the lowest LR (BEiT) or the full one (fairseq's data2vec 2.0 recipe)."""
    drop_path: float | None = None
    """Drop path of the last block, rising linearly from 0 (None: the pretrained model's setting)."""
    mixup: float = 0.0
    """Mixup Beta(a, a) parameter (0: off)."""
    cutmix: float = 0.0
    """CutMix Beta(a, a) parameter (0: off)."""
    mixup_prob: float = 1.0
    """Probability that a micro-batch is mixed at all."""
    mixup_switch_prob: float = 0.5
    """With both on: probability of CutMix rather than Mixup."""
    label_smoothing: float = 0.0
    """Share of the target spread over all classes."""
    auto_augment: str = ""
    """RandAugment policy ('rand-m9-mstd0.5-inc1'; '': none)."""
    erase_prob: float = 0.0
    """Random erasing probability (mode 'pixel', one rectangle)."""
    train_crop: str = "resize"
    """resize: the whole image at the model's size | random_resized: crop (area 0.08-1) + flip."""
    crop_pct: float = 1.0
    """Evaluation: the shorter side is resized to image_size / crop_pct, then the centre is cut."""
    fc_norm: bool = False
    """A fresh LayerNorm on the pooled vector (BEiT's and fairseq's fc_norm; removes a final encoder norm)."""
    head_init_scale: float = 1.0
    """Classifier weights start at trunc_normal(0.02) times this (BEiT's init_scale 0.001)."""
