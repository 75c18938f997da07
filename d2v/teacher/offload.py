"""A host-resident teacher streamed to the device one unit (block) at a time (docs/method.md §4).

The fp32 EMA weights live in host memory (pinned on CUDA machines so copies overlap compute).
Before a unit runs, its weights are copied to the device in the compute dtype; the next unit's
copy is started at the same time on a side stream, so the device holds about two teacher units,
not the whole teacher. After the unit ran its device copies are dropped. On a CPU-only machine
the same path runs with plain host copies and no pinning (CPU-only torch cannot pin memory).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def streaming_units(model: nn.Module) -> list[nn.Module]:
    """The units streamed in order: everything before the blocks, each block, then the rest."""
    enc = model.encoder
    units: list[nn.Module] = []
    if getattr(model, "frontend", None) is not None:
        units.append(model.frontend)
    units += [m for m in (enc.pos_conv, enc.cls_token, enc.rel_pos_bias, enc.layer_norm) if m is not None]
    units += list(enc.blocks)
    if enc.final_norm is not None:
        units.append(enc.final_norm)
    return units


class LayerStreamer:
    """Installs hooks that swap each unit's parameters for device copies while it runs."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device, self.dtype = device, dtype
        self.units = streaming_units(model)
        self.order = {id(u): i for i, u in enumerate(self.units)}
        # Parameters owned directly by container modules (none today) would stay resident.
        self.resident_params = [p for p in model.encoder.parameters(recurse=False)]
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staged: dict[int, list[Tensor]] = {}
        self._host: dict[int, list[Tensor]] = {}
        self.max_resident = 0
        self._handles: list = []

    def pin(self) -> None:
        if torch.cuda.is_available():
            for p in self.model.parameters():
                p.data = p.data.pin_memory()

    def _stage(self, index: int) -> None:
        if index >= len(self.units) or index in self._staged:
            return
        params = list(self.units[index].parameters())
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                self._staged[index] = [p.data.to(self.device, self.dtype, non_blocking=True) for p in params]
        else:
            self._staged[index] = [p.data.to(self.device, self.dtype, copy=True) for p in params]

    def _pre(self, unit: nn.Module, args) -> None:
        i = self.order[id(unit)]
        self._stage(i)
        self._stage(i + 1)  # prefetch the next unit while this one computes
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        params = list(unit.parameters())
        self._host[i] = [p.data for p in params]
        for p, staged in zip(params, self._staged[i]):
            p.data = staged
        self.max_resident = max(self.max_resident, len(self._staged))

    def _post(self, unit: nn.Module, args, output) -> None:
        i = self.order[id(unit)]
        for p, host in zip(unit.parameters(), self._host.pop(i)):
            p.data = host
        self._staged.pop(i, None)

    def __enter__(self) -> "LayerStreamer":
        self._resident_host = [p.data for p in self.resident_params]
        for p in self.resident_params:
            p.data = p.data.to(self.device, self.dtype)
        for unit in self.units:
            self._handles.append(unit.register_forward_pre_hook(self._pre))
            self._handles.append(unit.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, host in zip(self.resident_params, self._resident_host):
            p.data = host
        self._staged.clear()
        self._host.clear()

    def device_bytes_peak(self) -> int:
        """Largest device footprint of staged units seen (bytes), from unit sizes."""
        sizes = [sum(p.numel() for p in u.parameters()) * torch.finfo(self.dtype).bits // 8 for u in self.units]
        return max(a + b for a, b in zip(sizes, sizes[1:] + [0]))

