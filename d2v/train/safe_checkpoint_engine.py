"""DeepSpeed reads its checkpoint files through d2v.safe_load (no code in a file runs).

DeepSpeed's default TorchCheckpointEngine loads with `torch.load(weights_only=False)`, which
runs whatever a pickle names. `install_safe_checkpoint_engine(engine)` replaces the engine's
checkpoint engine (the model and ZeRO optimizer files of a resume) with one that loads through
d2v.safe_load. A few DeepSpeed readers bypass the checkpoint engine and call `torch.load`
themselves: the universal-checkpoint converter and loader, and zero_to_fp32 (export).
`guard_deepspeed_readers()` points the `torch` those modules see at a view of torch whose `load`
is d2v.safe_load; everything else is torch itself.
"""
from __future__ import annotations

import importlib
import types
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from d2v import safe_load

# DeepSpeed modules on d2v's resume, reshard and export paths that call torch.load directly.
DEEPSPEED_READERS = (
    "deepspeed.utils.zero_to_fp32",
    "deepspeed.checkpoint.ds_to_universal",
    "deepspeed.checkpoint.deepspeed_checkpoint",
    "deepspeed.checkpoint.zero_checkpoint",
    "deepspeed.checkpoint.universal_checkpoint",
    "deepspeed.runtime.base_optimizer",
    "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine",
)


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine (saving unchanged) whose loads accept tensors and plain data only."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load.load(path, map_location="cpu" if map_location is None else map_location)


class _TorchSafeLoad(types.ModuleType):
    """torch, except that `load` is d2v.safe_load (weights_only/mmap requests are ignored: the
    safe reader decides)."""

    def __init__(self) -> None:
        super().__init__("torch")
        # A copy of torch's namespace keeps attribute lookups in DeepSpeed's hot paths direct;
        # __getattr__ covers what torch gains later (lazily imported submodules).
        self.__dict__.update({k: v for k, v in vars(torch).items() if k not in ("load", "__name__", "__spec__")})

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        return safe_load.load(f, map_location="cpu" if map_location is None else map_location)


_TORCH_SAFE_LOAD = _TorchSafeLoad()


def guard_deepspeed_readers() -> None:
    """Idempotent; call before any DeepSpeed function that reads checkpoint files itself."""
    for name in DEEPSPEED_READERS:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = _TORCH_SAFE_LOAD


def install_safe_checkpoint_engine(engine: Any) -> None:
    """Call right after deepspeed.initialize: every file DeepSpeed reads back into `engine` (model
    states, ZeRO optimizer partitions, universal checkpoints) goes through d2v.safe_load."""
    guard_deepspeed_readers()
    current = engine.checkpoint_engine
    if isinstance(current, SafeCheckpointEngine):
        return
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"the DeepSpeed config selects the {type(current).__name__} checkpoint engine; d2v reads "
                         f"checkpoints only through torch's (remove `checkpoint.writer` and `datastates` from the "
                         f"ds_config)")
    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    safe.__dict__.update(current.__dict__)  # same serialization settings and name as the one replaced
    engine.checkpoint_engine = safe
