"""A host-resident teacher streamed to the device one unit (block) at a time (docs/method.md §4).

Host side (`HostWeights`): the fp32 EMA weights live in one flat host buffer, pinned once on CUDA
machines, and the teacher's parameters are views into it, so the EMA update, checkpoint loads and
exports work on them in place and they stay pinned. For a bf16/fp16 compute dtype a flat shadow
in that dtype holds the weights autocast would cast anyway (those of Linear and Conv modules),
refreshed from the master only where a parameter changed: the device receives 2 bytes a weight,
not 4. Everything else (norms, layer scales, tokens, bias tables) streams in fp32, as autocast
reads it in fp32 on a resident teacher.

Device side (`LayerStreamer`, one per forward): two slots of device memory, allocated on the
compute stream. Unit i is copied into slot i % 2 on a side stream and an event is recorded after
its copy; the compute stream waits for that event only, so block i computes while block i+1
copies. Before a slot takes unit i+2 the side stream waits for the event recorded after unit i's
compute. The slots are released on the compute stream after it waited for every copy into them,
so the caching allocator cannot hand their memory out while a copy or a kernel still uses it (no
`record_stream` needed). The host writes the master or shadow only after the last copy that
reads them has finished (`before_write`).

The stream, event, copy and pinning primitives come from a small object (`CudaCopies` on CUDA,
`HostCopies` elsewhere: plain synchronous copies, no pinning since CPU-only torch cannot pin), so
tests drive the CUDA ordering with a recording stand-in on a CPU.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# Modules whose parameters autocast casts to the compute dtype on every use (their forward calls
# F.linear / F.convNd, both on autocast's lower-precision lists on CPU and CUDA).
_AUTOCAST_CAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Every parameter starts 128 elements (256 bytes in bf16) into its piece: cuBLASLt chooses its
# algorithm by operand alignment up to 256 bytes, and the resident teacher's weights (fresh
# allocations) are at least that aligned, so both run the same kernels.
_ALIGN = 128


def _aligned(numel: int) -> int:
    return -(-numel // _ALIGN) * _ALIGN


def streaming_units(model: nn.Module) -> list[nn.Module]:
    """The units streamed, in the order the forward calls them: the feature encoder (a teacher fed
    the raw source has one), then the units its encoder declares (`streaming_units()`)."""
    frontend = getattr(model, "frontend", None)
    return ([frontend] if frontend is not None else []) + list(model.encoder.streaming_units())


def cast_by_autocast(module: nn.Module) -> bool:
    """Whether autocast casts this module's own parameters to the compute dtype whenever they
    are used: a plain Linear/Conv whose forward is the library's and that no hook rewrites
    (weight norm and parametrizations compute the weight in fp32 first)."""
    base = next((c for c in _AUTOCAST_CAST if isinstance(module, c)), None)
    return (base is not None and type(module).forward is base.forward and not module._forward_pre_hooks
            and not hasattr(module, "parametrizations"))


class HostCopies:
    """Primitives without streams: plain synchronous copies in one address space."""

    def compute_stream(self) -> Any:
        return None

    def side_stream(self) -> Any:
        return None

    def event(self, name: str) -> Any:
        return None

    def record(self, event: Any, stream: Any) -> None:
        pass

    def wait(self, stream: Any, event: Any) -> None:
        pass

    def synchronize(self, event: Any) -> None:
        pass

    def copy(self, dst: Tensor, src: Tensor, stream: Any) -> None:
        dst.copy_(src)

    def empty(self, numel: int, dtype: torch.dtype, device: torch.device, stream: Any) -> Tensor:
        return torch.empty(numel, dtype=dtype, device=device)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> Tensor:
        return torch.empty(numel, dtype=dtype)


class CudaCopies(HostCopies):
    """CUDA streams and events; non-blocking copies from and into pinned host memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def side_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def event(self, name: str) -> torch.cuda.Event:
        return torch.cuda.Event()

    def record(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
        event.record(stream)

    def wait(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def synchronize(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def copy(self, dst: Tensor, src: Tensor, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def empty(self, numel: int, dtype: torch.dtype, device: torch.device, stream: torch.cuda.Stream) -> Tensor:
        with torch.cuda.stream(stream):
            return torch.empty(numel, dtype=dtype, device=device)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=True)


def copies_for(device: torch.device) -> HostCopies:
    return CudaCopies(device) if device.type == "cuda" else HostCopies()


class HostWeights:
    """The teacher's fp32 weights in one (pinned) flat host buffer; its parameters are views.

    Per unit the buffer holds first the parameters autocast casts (piece 0), then the others
    (piece 1), so each piece streams with one copy."""

    def __init__(self, model: nn.Module, copies: HostCopies) -> None:
        self.copies = copies
        self.units = streaming_units(model)
        seen: set[int] = set()
        self.layout: list[list[tuple[nn.Parameter, int, int]]] = []  # per unit: (param, piece, offset)
        self.bounds: list[tuple[int, int, int]] = []  # per unit: start, end of piece 0, end
        start = 0
        for unit in self.units:
            pieces: tuple[list, list] = ([], [])
            for module in unit.modules():
                for p in module._parameters.values():
                    if p is not None and id(p) not in seen:
                        seen.add(id(p))
                        pieces[0 if cast_by_autocast(module) else 1].append(p)
            entries, sizes = [], []
            for piece, params in enumerate(pieces):
                offset = 0
                for p in params:
                    entries.append((p, piece, offset))
                    offset += _aligned(p.numel())
                sizes.append(offset)
            self.layout.append(entries)
            self.bounds.append((start, start + sizes[0], start + sizes[0] + sizes[1]))
            start += sizes[0] + sizes[1]
        stray = [n for n, p in model.named_parameters() if id(p) not in seen]
        if stray:
            raise ValueError(f"teacher.offload=cpu streams only {type(model).__name__}'s units; parameters outside "
                             f"them: {stray[:5]}; use teacher.offload=none")
        self.master = copies.host_buffer(start, torch.float32)
        self.master.zero_()  # the alignment gaps travel too
        self.views: list[list[Tensor]] = []
        for u, entries in enumerate(self.layout):
            views = []
            for p, piece, offset in entries:
                first = self.bounds[u][0] if piece == 0 else self.bounds[u][1]
                view = self.master[first + offset:first + offset + p.numel()].view(p.shape)
                view.copy_(p.data)
                p.data = view
                views.append(view)
            self.views.append(views)
        self.shadows: dict[torch.dtype, tuple[Tensor, list[Any]]] = {}
        self.last_read: Any = None  # event after the last device copy that read host memory

    def before_write(self) -> None:
        """Waits until no device copy still reads the host buffers."""
        if self.last_read is not None:
            self.copies.synchronize(self.last_read)
            self.last_read = None

    def _stamp(self, u: int) -> tuple[int, ...]:
        return tuple(p._version for p, _, _ in self.layout[u])

    def adopt(self) -> None:
        """Points parameters whose data was replaced (`p.data = ...`) back at their host views,
        with the new values, so they stay pinned and streamed."""
        for u, entries in enumerate(self.layout):
            for (p, _, _), view in zip(entries, self.views[u]):
                if p.data.data_ptr() != view.data_ptr() or p.data.shape != view.shape:
                    self.before_write()
                    view.copy_(p.data)
                    p.data = view
                    for _, stamps in self.shadows.values():
                        stamps[u] = None

    def refresh(self, dtype: torch.dtype) -> None:
        """Brings the `dtype` shadow of every changed unit up to date with the master."""
        if dtype == torch.float32:
            return
        if dtype not in self.shadows:
            self.shadows[dtype] = (self.copies.host_buffer(self.master.numel(), dtype),
                                   [None] * len(self.units))
        flat, stamps = self.shadows[dtype]
        for u, (start, lp_end, _) in enumerate(self.bounds):
            stamp = self._stamp(u)
            if stamps[u] != stamp:
                self.before_write()
                flat[start:lp_end].copy_(self.master[start:lp_end])  # round to nearest even, as autocast
                stamps[u] = stamp

    def pieces(self, u: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Unit u's two host pieces: autocast-cast weights in `dtype`, the rest in fp32."""
        start, lp_end, end = self.bounds[u]
        low = self.master if dtype == torch.float32 else self.shadows[dtype][0]
        return low[start:lp_end], self.master[lp_end:end]


class LayerStreamer:
    """For one forward: hooks that run each unit on device copies of its weights."""

    def __init__(self, host: HostWeights, device: torch.device, dtype: torch.dtype, copy_stream: Any) -> None:
        self.host, self.device, self.dtype = host, device, dtype
        self.copies = host.copies
        self.copy_stream = copy_stream
        self.order = {id(u): i for i, u in enumerate(host.units)}
        self._handles: list = []

    def __enter__(self) -> "LayerStreamer":
        host, c = self.host, self.copies
        host.adopt()
        host.refresh(self.dtype)
        self.compute = c.compute_stream()
        sizes = [max((b[1] - b[0] for b in host.bounds), default=0), max((b[2] - b[1] for b in host.bounds), default=0)]
        self.slots = [[c.empty(sizes[0], self.dtype, self.device, self.compute),
                       c.empty(sizes[1], torch.float32, self.device, self.compute)] for _ in range(2)]
        # The allocator may have handed the slots memory that kernels queued on the compute stream
        # still read: the copy stream's first fills wait for everything queued there so far.
        self.allocated = c.event("slots")
        c.record(self.allocated, self.compute)
        self.occupant: list[int | None] = [None, None]
        self.copied: dict[int, Any] = {}
        self.waited: set[int] = set()
        self.done: dict[int, Any] = {}
        self.running: set[int] = set()
        self.next = 0
        for unit in host.units:
            self._handles.append(unit.register_forward_pre_hook(self._pre))
            self._handles.append(unit.register_forward_hook(self._post))
        return self

    def _stage(self, j: int) -> None:
        if j >= len(self.host.units) or j in self.copied:
            return
        c, k = self.copies, j % 2
        previous = self.occupant[k]
        if previous is not None:
            c.wait(self.copy_stream, self.done[previous])  # the slot's last reader has finished
        else:
            c.wait(self.copy_stream, self.allocated)
        for buf, src in zip(self.slots[k], self.host.pieces(j, self.dtype)):
            if src.numel():
                c.copy(buf[:src.numel()], src, self.copy_stream)
        event = c.event(f"copied:{j}")
        c.record(event, self.copy_stream)
        self.copied[j], self.occupant[k] = event, j
        self.host.last_read = event

    def _pre(self, unit: nn.Module, args) -> None:
        i = self.order[id(unit)]
        if i != self.next:
            raise RuntimeError(f"the offloaded teacher's units ran out of order (unit {i} after {self.next - 1}): "
                               f"streaming_units must list them in the order the forward calls them")
        self._stage(i)
        self._stage(i + 1)  # block i+1 copies while block i computes
        self.copies.wait(self.compute, self.copied[i])
        self.waited.add(i)
        slot = self.slots[i % 2]
        for p, piece, offset in self.host.layout[i]:
            p.data = slot[piece][offset:offset + p.numel()].view(p.shape)
        self.running.add(i)

    def _restore(self, i: int) -> None:
        for (p, _, _), view in zip(self.host.layout[i], self.host.views[i]):
            p.data = view
        self.running.discard(i)

    def _post(self, unit: nn.Module, args, output) -> None:
        i = self.order[id(unit)]
        self._restore(i)
        event = self.copies.event(f"done:{i}")
        self.copies.record(event, self.compute)
        self.done[i] = event
        self.next = i + 1

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i in list(self.running):  # a forward that raised leaves its unit on the device
            self._restore(i)
        for j, event in self.copied.items():
            if j not in self.waited:  # a prefetch nobody consumed: order it before the slots' release
                self.copies.wait(self.compute, event)
        self.slots = []


class StudentPull:
    """The student's tracked weights brought to the host for the EMA update with non-blocking
    copies into one pinned flat buffer per dtype and a single wait."""

    def __init__(self, sources: list[Tensor], copies: HostCopies) -> None:
        self.copies = copies
        self.sources = sources
        sizes: dict[torch.dtype, int] = {}
        for s in sources:
            sizes[s.dtype] = sizes.get(s.dtype, 0) + s.numel()
        self.flats = {d: copies.host_buffer(n, d) for d, n in sizes.items()}
        # fp32 copies of the non-fp32 flats (an exact cast), made on the host after the wait.
        self.wide = {d: (f if d == torch.float32 else torch.empty(f.numel(), dtype=torch.float32))
                     for d, f in self.flats.items()}
        self.views, self.wide_views = [], []
        offsets = dict.fromkeys(sizes, 0)
        for s in sources:
            o = offsets[s.dtype]
            self.views.append(self.flats[s.dtype][o:o + s.numel()].view(s.shape))
            self.wide_views.append(self.wide[s.dtype][o:o + s.numel()].view(s.shape))
            offsets[s.dtype] = o + s.numel()

    def pull(self) -> list[Tensor]:
        """fp32 host copies of the sources as they are now (after the queued optimizer step)."""
        c = self.copies
        stream = c.compute_stream()
        for view, s in zip(self.views, self.sources):
            c.copy(view, s.detach(), stream)
        event = c.event("pulled")
        c.record(event, stream)
        c.synchronize(event)
        for d, flat in self.flats.items():
            if d != torch.float32:
                self.wide[d].copy_(flat)
        return self.wide_views
