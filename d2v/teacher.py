"""The EMA teacher (DESIGN.md 3.1 step 5, 4; STYLE.md 6): the one module that owns the
teacher's copy, its decay schedule, its update and its checkpoint form.

The teacher is a copy of the student's tracked parts held in fp32: a bf16 EMA at tau=0.9999
barely moves (updates fall below half a bf16 ulp). Parameters named by `copy_modules` are
copied from the student after every update (shared, not averaged); those named by
`ema_modules` are averaged; parts neither names (the head, the mask embedding, and the feature
encoder when the teacher consumes the student's features) are not in the teacher at all.
It runs in eval mode without gradients; its forward builds the targets in streaming form.
"""
from __future__ import annotations

import copy
import contextlib

import torch
from torch import Tensor, nn

import kernels
from d2v.config.schema import TeacherConfig
from d2v.models.blocks import BlockOutput
from d2v.models.data2vec import Data2Vec


def ema_decay(step: int, start: float, end: float, anneal_steps: int) -> float:
    """tau rises linearly from `start` to `end` over `anneal_steps` updates, then stays at `end`."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return end - (end - start) * (1.0 - step / anneal_steps)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class Teacher(nn.Module):
    def __init__(self, student: Data2Vec, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        model = copy.deepcopy(student)
        model.head = None
        model.mask_embedding = None
        if cfg.input == "features":
            model.frontend = None  # it consumes the student's features: no CNN of its own
        self.model = model.float().eval().requires_grad_(False)
        self.ema_names, self.copy_names = self._classify()
        self.bind(student)

    def _classify(self) -> tuple[list[str], list[str]]:
        ema, cp, orphans = [], [], []
        for name, _ in self.model.named_parameters():
            if _under(name, self.cfg.copy_modules):
                cp.append(name)
            elif _under(name, self.cfg.ema_modules):
                ema.append(name)
            else:
                orphans.append(name)
        if orphans:
            raise ValueError(
                f"teacher parameters neither averaged nor copied: {orphans[:5]}{'...' if len(orphans) > 5 else ''}; "
                f"add their modules to teacher.ema_modules or teacher.copy_modules")
        if not ema:
            raise ValueError(f"teacher.ema_modules={self.cfg.ema_modules} match no parameter")
        return ema, cp

    def bind(self, student: nn.Module) -> None:
        """Points the update at `student`'s parameters (call again after DeepSpeed wraps it)."""
        params = dict(student.named_parameters())
        mine = dict(self.model.named_parameters())
        missing = [n for n in self.ema_names + self.copy_names if n not in params]
        if missing:
            raise ValueError(f"student lacks teacher parameters {missing[:5]}")
        # Plain lists of tensors: registering the student as a submodule would make its
        # parameters part of the teacher's.
        self._ema_pairs = [(mine[n], params[n]) for n in self.ema_names]
        self._copy_pairs = [(mine[n], params[n]) for n in self.copy_names]
        self.model.eval()

    def ema_parameters(self) -> list[Tensor]:
        """The averaged (fp32) parameters, in a fixed order."""
        return [t for t, _ in self._ema_pairs]

    def train(self, mode: bool = True) -> "Teacher":
        """The teacher always runs in eval mode (no dropout, no LayerDrop)."""
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, step: int) -> float:
        """One EMA step after optimizer update `step` (0-based count of updates done before it)."""
        tau = ema_decay(step, self.cfg.ema_start, self.cfg.ema_end, self.cfg.ema_anneal_steps)
        if tau < 1.0:
            targets = [t for t, _ in self._ema_pairs]
            sources = [s.detach().float() for _, s in self._ema_pairs]  # bf16 students: cast to fp32
            torch._foreach_lerp_(targets, sources, 1.0 - tau)
        for t, s in self._copy_pairs:
            t.copy_(s.detach())
        return tau

    @torch.no_grad()
    def targets(self, x_BTD: Tensor, padding_mask_BT: Tensor | None = None, *,
                compute_dtype: torch.dtype | None = None) -> Tensor:
        """fp32 B×T×D targets from the clean input (features or source, per teacher.input)."""
        cfg = self.cfg
        depth = len(self.model.encoder.blocks)
        first = depth - cfg.top_k
        acc: list[Tensor | None] = [None]

        def tap(index: int, out: BlockOutput) -> None:
            if index >= first:
                layer = out.ffn if cfg.tap == "ffn" else out.x
                acc[0] = kernels.accumulate(acc[0], layer, layer_norm=cfg.layer_norm, padding_mask=padding_mask_BT)

        device_type = x_BTD.device.type
        use_amp = compute_dtype is not None and compute_dtype != torch.float32
        amp = torch.autocast(device_type, dtype=compute_dtype) if use_amp else contextlib.nullcontext()
        with amp:
            x = x_BTD if cfg.input == "features" else self.model.features(x_BTD).x
            self.model.encode(x, padding_mask_BT, None, tap=tap)
        assert acc[0] is not None
        return kernels.finalize(acc[0], top_k=cfg.top_k, final_norm=cfg.final_norm, padding_mask=padding_mask_BT)
