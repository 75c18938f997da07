"""Counts host-device synchronisations: every point where the host waits for the device.

On a GPU these are `.item()` / `float()` / `bool()` of a device tensor, data-dependent shapes
(`nonzero`, boolean-mask indexing, `masked_select`, `repeat_interleave` without an output size,
`unique`), comparisons that return a Python bool (`equal`) and device-to-host copies (`.cpu()`,
`.tolist()`, `.numpy()`), and device-wide waits (the accelerator's, an Event's or a Stream's
`synchronize()`), and tensors built from host data on a device (`torch.tensor(x, device=...)`,
a blocking host-to-device copy that dispatches no operator). Each one stalls the CPU until the
GPU has drained its queue, so the next kernels are launched late; a training step should need
about one (the skip decision).

`device_view=True` (the default on a CPU-only machine) treats every tensor as if it lived on an
accelerator: during a training step every tensor is a device tensor on a GPU run (the host-side
data is prepared before the step), so a CPU run counts what a GPU run would. On a GPU
(`device_view=False`) only operations that really touch a device tensor are counted, and
host-to-device copies from pageable memory are counted separately (`h2d_pageable`).
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_paused = [0]  # depth of host_work() blocks: their tensors are host tensors even in device view


@contextmanager
def host_work() -> Iterator[None]:
    """Marks code that works on host copies (a batch before it moves): nothing in it waits for
    the device, so a counter in device view leaves it out."""
    _paused[0] += 1
    try:
        yield
    finally:
        _paused[0] -= 1

_SCALAR_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
_SHAPE_OPS = {aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
              aten._unique2.default, aten.unique_dim.default, aten.nonzero_static.default}


def _tensors(args) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that counts synchronising operations by kind (see the module docstring)."""

    def __init__(self, device_view: bool | None = None) -> None:
        super().__init__()
        self.device_view = (not torch.cuda.is_available()) if device_view is None else device_view
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self.record_sites = False
        self.host_storages: set[int] = set()

    def _on_device(self, t: torch.Tensor) -> bool:
        if _paused[0]:
            return False
        if self.device_view:
            # what `.cpu()` returned is a host copy: reading it waits for nothing
            return t.device.type == "cpu" and t.untyped_storage().data_ptr() not in self.host_storages
        return t.device.type not in ("cpu", "meta")

    def _hit(self, kind: str) -> None:
        self.counts[kind] += 1
        if self.record_sites:
            import traceback

            frames = [f for f in traceback.extract_stack()[:-3] if "torch/" not in f.filename
                      and "host_sync.py" not in f.filename]
            if frames:
                f = frames[-1]
                self.sites[f"{kind} {f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = list(_tensors(args))
        first = tensors[0] if tensors else None
        if first is not None and self._on_device(first):
            if func in _SCALAR_OPS:
                self._hit("scalar")
            elif func in _SHAPE_OPS:
                self._hit("data_dependent_shape")
            elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
                indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(i is not None and i.dtype == torch.bool for i in indices):
                    self._hit("boolean_index")
            elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                self._hit("data_dependent_shape")
        if func in (aten._to_copy.default, aten.copy_.default) and first is not None:
            src = args[1] if func is aten.copy_.default else first
            dst_device = (args[0].device if func is aten.copy_.default
                          else kwargs.get("device") or first.device)
            dst_cpu = torch.device(dst_device).type == "cpu"
            if not self.device_view and src.device.type == "cuda" and dst_cpu:
                self._hit("device_to_host")
            elif not self.device_view and src.device.type == "cpu" and not dst_cpu:
                # A blocking copy waits for the stream; a non-blocking one from pageable memory
                # is staged by the driver and only reported.
                blocking = not (args[2] if func is aten.copy_.default and len(args) > 2
                                else kwargs.get("non_blocking", False))
                if blocking:
                    self._hit("host_to_device_blocking")
                elif not src.is_pinned():
                    self.counts["h2d_pageable"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        """Synchronisations (host-to-device copies from pageable memory are reported, not summed)."""
        return sum(v for k, v in self.counts.items() if k != "h2d_pageable")


_FROM_HOST_DATA = (torch.tensor, torch.as_tensor, torch.scalar_tensor)


class HostDataCounter(TorchFunctionMode):
    """Counts tensors built from host data straight on a device (`torch.tensor(x, device=d)`):
    the copy blocks and no operator shows it to a dispatch mode. In device view an explicit device
    counts whatever it is (DeepSpeed names its accelerator's, which is `cpu` on a CPU run)."""

    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_HOST_DATA and not _paused[0]:
            device = kwargs.get("device")
            data = args[0] if args else kwargs.get("data")
            from_host = not isinstance(data, torch.Tensor) or data.device.type == "cpu"
            if device is not None and from_host and (self.counter.device_view or torch.device(device).type != "cpu"):
                self.counter._hit("host_data_to_device")
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs(device_view: bool | None = None, *, sites: bool = False) -> Iterator[HostSyncCounter]:
    """Counts synchronisations inside the block. In device view, `.tolist()`, `.numpy()` and
    `.cpu()` are counted too: on a CPU tensor they dispatch nothing, on a GPU tensor they copy."""
    counter = HostSyncCounter(device_view)
    counter.record_sites = sites
    patched = {}
    inside = [0]
    if counter.device_view:
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)
            patched[name] = original

            def wrapper(self, *a, _original=original, _name=name, **k):
                # a torch-function mode hands the call back to this wrapper once more: count once
                if not _paused[0] and not inside[0] and counter._on_device(self):
                    counter._hit("device_to_host")
                inside[0] += 1
                try:
                    out = _original(self, *a, **k)
                finally:
                    inside[0] -= 1
                if _name == "cpu":
                    # a distinct host copy (on a CPU `.cpu()` returns the tensor itself)
                    out = out.clone()
                    counter.host_storages.add(out.untyped_storage().data_ptr())
                return out

            setattr(torch.Tensor, name, wrapper)
    waits = _patch_device_waits(counter)
    try:
        with counter, HostDataCounter(counter):
            yield counter
    finally:
        for name, original in patched.items():
            setattr(torch.Tensor, name, original)
        for owner, name, original in waits:
            setattr(owner, name, original)


def _patch_device_waits(counter: HostSyncCounter) -> list[tuple[object, str, object]]:
    """Counts the waits no tensor operation shows: the accelerator's `synchronize()` (DeepSpeed
    calls it from its timers and ZeRO; a no-op on its CPU accelerator but still called),
    torch.cuda's, and an Event's or Stream's `synchronize()` (as "device_wide")."""
    owners: list[tuple[object, str]] = []
    try:
        from deepspeed.accelerator import get_accelerator

        owners.append((get_accelerator(), "synchronize"))
    except ImportError:
        pass
    owners += [(torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize")]
    patched = []
    for owner, name in owners:
        original = getattr(owner, name)
        patched.append((owner, name, original))

        def counted(*a, _original=original, **k):
            counter._hit("device_wide")
            return _original(*a, **k)

        setattr(owner, name, counted)
    return patched
