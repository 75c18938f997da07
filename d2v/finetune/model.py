"""A pretrained encoder with a task head (README, fine-tuning).

The backbone is the data2vec student without its pretraining parts (regression head, mask
embedding). The head is the task's (d2v.finetune.tasks): it maps the encoder outputs and padding
mask to logits. Speech recognition puts a linear CTC head on every frame (`FrameHead`);
classification averages the encoder outputs over the real (non-padded) positions, the CLS token
excluded (BEiT's fine-tuning pooling; it also suits the tiny text models), and applies a linear
layer (`MeanPoolHead`).

Legend: B batch, S waveform samples, T positions, D width, V outputs (vocabulary or classes).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor, nn

from d2v.config.schema import ModelConfig
from d2v.finetune.masking import FeatureMasking
from d2v.models import Data2Vec, build_model


class TaskOutput(NamedTuple):
    logits: Tensor
    """B×T×V per position (frames=True) or B×V per example."""
    padding_mask: Tensor | None
    """B×T bool, True at padded positions (None when nothing is padded)."""


class FrameHead(nn.Linear):
    """Logits at every position: B×T×D -> B×T×V."""

    def __init__(self, embed_dim: int, num_outputs: int) -> None:
        super().__init__(embed_dim, num_outputs)
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, h_BTD: Tensor, padding_BT: Tensor | None = None) -> Tensor:
        return super().forward(h_BTD)


class MeanPoolHead(FrameHead):
    """Logits per example from the mean over real positions: B×T×D -> B×V."""

    def forward(self, h_BTD: Tensor, padding_BT: Tensor | None = None) -> Tensor:
        return super().forward(masked_mean(h_BTD, padding_BT))


class FinetuneModel(nn.Module):
    def __init__(self, backbone: Data2Vec, head: nn.Module, *, dropout: float = 0.0,
                 masking: FeatureMasking | None = None) -> None:
        super().__init__()
        time_masking = masking is not None and masking.time
        if time_masking and backbone.mask_embedding is None:
            raise ValueError("time masking while fine-tuning needs the pretrained mask embedding, which this encoder "
                             "lacks (2.0 drops masked positions instead); set finetune.mask_prob=0")
        # Pretraining-only parts (1.0 head, 2.0 decoder; the mask embedding unless fine-tuning masks).
        for part in ("head", "decoder") + (() if time_masking else ("mask_embedding",)):
            if getattr(backbone, part, None) is not None:
                setattr(backbone, part, None)
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = head
        self.masking = masking if masking is not None and masking.active else None
        # Set by the loop: while True the backbone runs without autograd (only the head learns).
        self.freeze_backbone = False
        # Set by the loop per update, the same on every rank: LayerDrop's draw and the masks' seed.
        self.step_seed: int | None = None

    def encode(self, source: Tensor, source_lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """B×T×D encoder outputs and the padding mask; in training with masking, of masked features."""
        feats = self.backbone.features(source, source_lengths)
        time_BT = channel_BD = None
        if self.training and self.masking is not None:
            B, T, D = feats.x.shape
            time_BT, channel_BD = self.masking.draw(B, T, D, feats.padding_mask, self._mask_generator())
            time_BT = None if time_BT is None else time_BT.to(feats.x.device)
            channel_BD = None if channel_BD is None else channel_BD.to(feats.x.device)
        layer_seed = self.step_seed if self.training else None
        return self.backbone.encode(feats.x, feats.padding_mask, time_BT, layer_seed=layer_seed,
                                    channel_mask_BD=channel_BD), feats.padding_mask

    def _mask_generator(self) -> torch.Generator:
        """Seeded by the update and the rank (each rank masks its own batch differently)."""
        if self.step_seed is None:
            return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        from d2v import collectives

        return torch.Generator().manual_seed(self.step_seed * 4099 + collectives.rank())

    def forward(self, source: Tensor, source_lengths: Tensor | None = None) -> TaskOutput:
        frozen = self.freeze_backbone and self.training
        with torch.no_grad() if frozen else contextlib.nullcontext():
            h_BTD, padding_BT = self.encode(source, source_lengths)
        return TaskOutput(self.head(self.dropout(h_BTD), padding_BT), padding_BT)


def masked_mean(h_BTD: Tensor, padding_BT: Tensor | None) -> Tensor:
    """B×D mean over the positions that are not padding."""
    if padding_BT is None:
        return h_BTD.mean(dim=1)
    keep = (~padding_BT).unsqueeze(-1).to(h_BTD.dtype)
    return (h_BTD * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def freeze_feature_encoder(model: FinetuneModel) -> int:
    """No gradient into the conv layers of a waveform encoder (fairseq's feature_grad_mult=0);
    its LayerNorm and projection keep training. Returns the number of frozen parameters."""
    convs = getattr(model.backbone.frontend, "conv_layers", None)
    if convs is None:
        raise ValueError("finetune.freeze_feature_encoder applies to speech encoders only; set it to false")
    frozen = 0
    for p in convs.parameters():
        p.requires_grad_(False)
        frozen += p.numel()
    return frozen


def load_backbone(init: str, model_cfg: ModelConfig, *, random_init: bool, seed: int) -> Data2Vec:
    """The student of a d2v checkpoint or export directory; with random_init the same architecture
    freshly initialised (seeded), so that the two differ only in their weights."""
    torch.manual_seed(seed)
    if random_init or not init:
        return build_model(model_cfg)
    from d2v.finetune.config import is_transformers_dir

    if is_transformers_dir(init):  # the same key checks as pretraining's --init-from
        from d2v.interop import init_from

        student = build_model(model_cfg)
        init_from(student, init, allow_missing=("head", "decoder", "mask_embedding"))
        return student
    from d2v.export import load_student  # export directory or checkpoint of any ZeRO stage

    student, _ = load_student(init)
    return student
