"""Shared helpers for the kernel tests: the Triton interpreter inside one pytest session, and
the GPU-compile step in a clean subprocess.

Why: @triton.jit decides at decoration (module import) time whether a kernel is compiled or
interpreted, from TRITON_INTERPRET. One pytest session runs both the interpreter parity tests
and the sm_80/sm_90 compile tests, so neither may set the variable globally:
* `interpreted(*module_names)` sets TRITON_INTERPRET=1, imports or reloads the named kernel
  modules so their kernels become InterpretedFunctions, yields them, then restores the variable
  and reloads the modules again so later tests see compiled kernels. While active it also routes
  calls of triton.language's own @jit helpers (tl.sum, tl.zeros, ...; decorated when triton
  was first imported, normally in compiled mode) through the interpreter. Dispatch code must reach
  kernels through the module attribute (`_tt.kernel`), which a reload updates in place.
  Use it from a module-scoped fixture.
* `gpu_compile_results(modules)` runs `python -m d2v.kernels.gpu_compile --json` in a subprocess
  with TRITON_INTERPRET removed and returns the resource records as dicts.
* `nan_poison()` makes torch.empty* return NaN-filled memory (deterministic mode) so any output
  element a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parents[1]


def _interpret_device_call(self, *args, **kwargs):
    """JITFunction.__call__ while interpreting: run the function as the interpreter would."""
    from triton.runtime.interpreter import InterpretedFunction

    fn = _INTERPRETED.get(id(self))  # id: hashing a JITFunction walks its AST, which fails here
    if fn is None:
        fn = _INTERPRETED[id(self)] = InterpretedFunction(self.fn)
    return fn(*args, **kwargs)


_INTERPRETED: dict = {}  # id(JITFunction) → InterpretedFunction; triton's helpers live forever


@contextlib.contextmanager
def interpreted(*module_names: str) -> Iterator[list[ModuleType]]:
    from triton.runtime.jit import JITFunction

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    # triton.language's own @jit helpers (tl.sum, tl.zeros, tl.max ...) were decorated when
    # triton was first imported, usually in compiled mode (collection imports it); a kernel
    # interpreted later calls them as device functions, which JITFunction refuses. Route those
    # calls through InterpretedFunction for the duration.
    compiled_call = JITFunction.__call__
    JITFunction.__call__ = _interpret_device_call
    try:
        modules = [importlib.reload(importlib.import_module(name)) for name in module_names]
        yield modules
    finally:
        JITFunction.__call__ = compiled_call
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
        for name in module_names:
            importlib.reload(sys.modules[name])


@contextlib.contextmanager
def nan_poison() -> Iterator[None]:
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(4).isnan().all(), "deterministic mode no longer NaN-fills torch.empty"
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def gpu_compile_results(modules: list[str] | None = None, timeout: float = 300) -> tuple[int, list[dict], str]:
    """(exit code, resource records, stderr) of kernels.gpu_compile run in a clean subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the 3.9 default; silences its warning
    cmd = [sys.executable, "-m", "d2v.kernels.gpu_compile", "--json"]
    for m in modules or []:
        cmd += ["--module", m]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    records = json.loads(proc.stdout) if proc.stdout.strip() else []
    return proc.returncode, records, proc.stderr
