"""The Teacher: tracked scope, EMA schedule and update, placement, targets, checkpoint form.

The teacher is a copy of the student's tracked parts. Parameters named by `copy_modules` are
copied from the student after every update (shared, not averaged); those named by `ema_modules`
are averaged in fp32 (a bf16 EMA at tau=0.9999 barely moves: updates fall below half a bf16
ulp); parts neither names (the head, the mask embedding, and the feature encoder when the
teacher consumes the student's features) are not in the teacher at all. It runs in eval mode
without gradients, and builds the targets while it runs (streaming accumulate/finalize).

Placement (docs/method.md §4):
* replicated (student under ZeRO 0/1/2): an fp32 module on every rank, updated with foreach
  lerp from the student's weights (bf16 module weights cast to fp32 in DeepSpeed's bf16 mode);
* ZeRO-3 (`attach_zero3`): partitioned like the student, fp32 EMA per local slice, updated from
  the local fp32 master slices without communication (see `zero3.py`);
* `offload: cpu`: the weights stay in (pinned) host memory and are streamed to the device a
  unit at a time in the compute dtype (`offload.py`); the EMA update runs on the host after one
  batched pull of the student's weights. Under ZeRO-3 the teacher engine offloads its partitions
  instead.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import Tensor, nn

from d2v import kernels
from d2v.config.schema import TeacherConfig
from d2v.models.blocks import BlockOutput
from d2v.models.data2vec import Data2Vec, TeacherNet
from d2v.teacher.offload import HostCopies, HostWeights, LayerStreamer, StudentPull, copies_for
from d2v.teacher.schedule import ema_decay


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


EMA_CHUNK_ELEMENTS = 16 * 2**20  # 64 MB of fp32 copies at a time


def ema_chunks(pairs: list[tuple[Tensor, Tensor]]) -> list[list[tuple[Tensor, Tensor]]]:
    """(EMA, student) pairs in order, cut into runs of at most EMA_CHUNK_ELEMENTS (a larger
    tensor alone)."""
    chunks: list[list[tuple[Tensor, Tensor]]] = [[]]
    size = 0
    for pair in pairs:
        n = pair[0].numel()
        if chunks[-1] and size + n > EMA_CHUNK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(pair)
        size += n
    return [c for c in chunks if c]


class Teacher(nn.Module):
    def __init__(self, student: Data2Vec, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Without a feature encoder of its own it consumes the student's features (audio: no CNN).
        frontend = copy.deepcopy(student.frontend) if cfg.input == "source" else None
        model = TeacherNet(frontend, copy.deepcopy(student.encoder))
        self.model = model.float().eval().requires_grad_(False)
        self.ema_names, self.copy_names = self._classify()
        self.zero3 = None  # a ShardedEMA once attach_zero3 ran
        self._copies: HostCopies | None = None
        self._host: HostWeights | None = None  # an offloaded teacher's host buffers, once used
        self._pull: StudentPull | None = None
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

    # -- placement ---------------------------------------------------------------------------
    def bind(self, student: nn.Module) -> None:
        """Points the update at `student`'s parameters (call again after DeepSpeed wraps it)."""
        if self.zero3 is not None:
            self.zero3.bind(student)
            return
        params = dict(student.named_parameters())
        mine = dict(self.model.named_parameters())
        missing = [n for n in self.ema_names + self.copy_names if n not in params]
        if missing:
            raise ValueError(f"student lacks teacher parameters {missing[:5]}")
        # Plain lists of tensors: registering the student as a submodule would make its
        # parameters part of the teacher's.
        self._ema_pairs = [(mine[n], params[n]) for n in self.ema_names]
        self._copy_pairs = [(mine[n], params[n]) for n in self.copy_names]
        self._pull = None  # rebuilt for these sources at the next update
        self.model.eval()

    def attach_zero3(self, student: nn.Module, student_ds_config: dict[str, Any]) -> None:
        """Re-homes the teacher as a partitioned ZeRO-3 engine next to a ZeRO-3 student."""
        from d2v.teacher.zero3 import ShardedEMA

        self.zero3 = ShardedEMA(self.model, self.ema_names, self.copy_names, student, student_ds_config,
                                offload=self.cfg.offload == "cpu")
        self.model = self.zero3.module
        self._ema_pairs = self._copy_pairs = []
        self._host = self._pull = None  # the engine offloads its own partitions

    @property
    def offloaded(self) -> bool:
        return self.cfg.offload == "cpu" and self.zero3 is None

    def place(self, device: torch.device, *, copies: HostCopies | None = None) -> "Teacher":
        """Moves a replicated teacher to `device`, or keeps an offloaded one in host memory and
        streams it to `device`. copies: the stream/copy primitives (default: CUDA's on a CUDA
        device). The host buffers are built and pinned at the first forward or update, so a
        teacher that ZeRO-3 re-homes never pins a full copy."""
        if self.zero3 is None and not self.offloaded:
            self.model.to(device)
        elif self.offloaded:
            device = torch.device(device)
            if self._host is not None:
                self._host.before_write()
            self._host, self._pull = None, None
            self._copies = copies if copies is not None else copies_for(device)
            # Buffers (position tables, ALiBi slopes, index maps) are small and every forward
            # reads them on the device: they live there, only parameters stream.
            for module in self.model.modules():
                for name, b in module._buffers.items():
                    if b is not None:
                        module._buffers[name] = b.to(device)
        return self

    def _placed_host(self, device: torch.device) -> HostWeights:
        if self._copies is None:  # never placed: stream to where the inputs are
            self.place(device)
        if self._host is None:
            self._host = HostWeights(self.model, self._copies)
            self._copy_stream = self._copies.side_stream()
        return self._host

    def train(self, mode: bool = True) -> "Teacher":
        """The teacher always runs in eval mode (no dropout, no LayerDrop)."""
        super().train(False)
        return self

    # -- update ------------------------------------------------------------------------------
    def ema_parameters(self) -> list[Tensor]:
        """The averaged fp32 parameters (local slices under ZeRO-3), in a fixed order."""
        if self.zero3 is not None:
            return list(self.zero3.shards)
        return [t for t, _ in self._ema_pairs]

    @torch.no_grad()
    def update(self, step: int) -> float:
        """One EMA step after optimizer update `step` (0-based count of updates done before it)."""
        tau = ema_decay(step, self.cfg.ema_start, self.cfg.ema_end, self.cfg.ema_anneal_steps)
        if self.zero3 is not None:
            self.zero3.update(tau)
            return tau
        if self.offloaded:
            self._update_on_host(tau)
            return tau
        if tau < 1.0:
            # bf16 students: cast to fp32 (exact), a chunk at a time, so that the transient fp32
            # copies stay under EMA_CHUNK_ELEMENTS instead of a second copy of the whole student
            # (380 MB for audio_base).
            for chunk in ema_chunks(self._ema_pairs):
                sources = [s.detach().to(device=t.device, dtype=torch.float32) for t, s in chunk]
                torch._foreach_lerp_([t for t, _ in chunk], sources, 1.0 - tau)
        for t, s in self._copy_pairs:
            t.copy_(s.detach())
        return tau

    def _update_on_host(self, tau: float) -> None:
        # The fp32 master has its only copy on the host, so the update runs there: one pull of
        # the student (2 bytes a weight for a bf16 student, one wait) and the same foreach lerp
        # as the resident update. A device-side update would move the fp32 master both ways
        # (8 bytes a weight) every step.
        pairs = self._ema_pairs + self._copy_pairs
        host = self._placed_host(pairs[0][1].device)
        host.adopt()
        if self._pull is None:
            self._pull = StudentPull([s for _, s in pairs], host.copies)
        sources = self._pull.pull()
        host.before_write()
        n = len(self._ema_pairs)
        if tau < 1.0:
            torch._foreach_lerp_([t for t, _ in self._ema_pairs], sources[:n], 1.0 - tau)
        if self._copy_pairs:
            torch._foreach_copy_([t for t, _ in self._copy_pairs], sources[n:])

    # -- targets -----------------------------------------------------------------------------
    @torch.no_grad()
    def targets(self, inputs: Tensor, padding_mask_BT: Tensor | None = None, *,
                compute_dtype: torch.dtype | None = None) -> Tensor:
        """fp32 B×T×D targets from the clean view: features (B×T×D) or the raw source."""
        cfg = self.cfg
        first = len(self.model.encoder.blocks) - cfg.top_k
        acc: list[Tensor | None] = [None]

        def tap(index: int, out: BlockOutput) -> None:
            if index >= first:
                layer = out.ffn if cfg.tap == "ffn" else out.x
                acc[0] = kernels.accumulate(acc[0], layer, layer_norm=cfg.layer_norm, padding_mask=padding_mask_BT)

        dtype = compute_dtype or torch.float32
        use_amp = self.zero3 is None and dtype != torch.float32
        amp = torch.autocast(inputs.device.type, dtype=dtype) if use_amp else contextlib.nullcontext()
        # Offloaded: weights autocast casts stream in the compute dtype (the same rounding autocast
        # applies to a resident fp32 teacher), the rest in fp32, so every GEMM gets bitwise the
        # operands it gets on a resident teacher on the same device.
        stream = (LayerStreamer(self._placed_host(inputs.device), inputs.device,
                                dtype if use_amp else torch.float32, self._copy_stream)
                  if self.offloaded else contextlib.nullcontext())
        if self.zero3 is not None and inputs.is_floating_point():
            inputs = inputs.to(dtype)  # a ZeRO-3 teacher holds weights in the compute dtype
        run = self.zero3.engine if self.zero3 is not None else self.model
        with amp, stream:
            run(inputs, padding_mask_BT, tap=tap)
        assert acc[0] is not None
        return kernels.finalize(acc[0], top_k=cfg.top_k, final_norm=cfg.final_norm, padding_mask=padding_mask_BT)

    # -- checkpoint form ---------------------------------------------------------------------
    def export_state(self) -> dict[str, Tensor]:
        """Full fp32 weights, independent of the world size. Under ZeRO-3 every rank must call."""
        if self.zero3 is not None:
            return self.zero3.gather_full()
        return {n: p.detach().float().cpu().clone() for n, p in self.model.named_parameters()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Loads `export_state` output written at any world size and ZeRO stage."""
        expected = set(self.ema_names + self.copy_names)
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise KeyError(f"teacher state does not fit: missing {missing[:5]}, unexpected {extra[:5]}")
        if self.zero3 is not None:
            self.zero3.load_full(state)
            return
        if self._host is not None:
            self._host.adopt()
            self._host.before_write()  # in place: the host views stay pinned
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(state[n])
