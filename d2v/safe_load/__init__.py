"""The one way d2v reads a checkpoint, an export, a fairseq or a transformers weight file: no code
in the file ever runs.

What a file is gets decided from its first bytes and (for zips) its table of contents before
anything in it is deserialised. Accepted: safetensors, torch's zip checkpoints (`torch.save`) and
its older plain-pickle layout (`_use_new_zipfile_serialization=False`, which DeepSpeed may
write). Refused: TorchScript archives (torch.load would hand them to torch.jit.load, which runs
their code), torch's legacy tar layout, and anything else. Pickles are read by torch's
weights-only unpickler, which builds tensors and plain containers only; the few other globals a
legitimate file holds are allowed by exact name (`INERT`): numpy arrays and scalars (RNG states)
and three data-only DeepSpeed records. `records=True` (fairseq checkpoints) also turns their
configuration and logging objects (argparse Namespace, omegaconf DictConfig, fairseq meters) into
the inert stand-ins of d2v.safe_load.unpickle, which only store what they are given.
"""
from __future__ import annotations

import _compat_pickle
import os
import pickle
import pickletools
import re
import struct
import zipfile
from typing import Any, BinaryIO

import torch


class RefusedFile(ValueError):
    """A file d2v will not deserialise, or cannot read as weights; the message names the file."""


_HOW = ("d2v reads only tensors and plain containers (dicts, lists, numbers, strings): save a state dict "
        "with torch.save or safetensors from an environment you trust, and pass that file instead")


def _numpy_globals() -> list[tuple[Any, str]]:
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    out = []
    # Both spellings: numpy 1.x pickles name numpy.core, numpy 2.x numpy._core.
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{prefix}._reconstruct"), (multiarray.scalar, f"{prefix}.scalar")]
    out += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    # numpy 2 builds each dtype as an instance of its class in numpy.dtypes, which the state then
    # fills in: those classes must be allowed too (they are C types with numpy's own setstate).
    dtypes = getattr(np, "dtypes", None)
    for name in dir(dtypes) if dtypes is not None else ():
        cls = getattr(dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            out.append((cls, f"numpy.dtypes.{name}"))
    return out


def _deepspeed_globals() -> list[tuple[Any, str]]:
    """Records DeepSpeed puts into its ZeRO optimizer files: data only, no __setstate__ or
    __reduce__ of their own (a dataclass of two ints, an int enum, loss-scale holders)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [(c, f"{c.__module__}.{c.__qualname__}") for c in
            (fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler)]


_INERT: list[tuple[Any, str]] | None = None


def inert_globals() -> list[tuple[Any, str]]:
    """(object, pickled name) pairs every load allows besides torch's own tensor rebuilders."""
    global _INERT
    if _INERT is None:
        _INERT = _numpy_globals() + _deepspeed_globals()
    return _INERT


# Classes and types a fairseq configuration refers to by name (omegaconf's ref_type/object_type).
_RECORD_TYPE_REFS = {f"builtins.{t.__name__}": t for t in (object, dict, list, tuple, int, float, str, bool, bytes)}


def _is_zip(f: BinaryIO) -> bool:
    f.seek(0)
    ok = zipfile.is_zipfile(f)
    f.seek(0)
    return ok


def file_kind(f: BinaryIO, path: str) -> str:
    """'safetensors', 'torch-zip' or 'torch-pickle'; raises RefusedFile for every other kind.
    Reads headers and a zip's table of contents only."""
    f.seek(0)
    head = f.read(512)
    f.seek(0)
    size = os.fstat(f.fileno()).st_size
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise RefusedFile(f"{path} is a tar archive (torch's legacy tar checkpoint layout, or another archive): "
                          f"d2v does not read it, because unpacking it needs a full unpickler. {_HOW}")
    if head[:2] == b"PK" and _is_zip(f):
        with zipfile.ZipFile(f) as z:
            names = z.namelist()
        f.seek(0)
        tops = {n.split("/", 1)[0] for n in names}
        inner = [n.split("/", 1)[1] if "/" in n else n for n in names]
        if any(n == "constants.pkl" or n.startswith("code/") or n == "bytecode.pkl" for n in inner):
            raise RefusedFile(f"{path} is a TorchScript archive (it holds constants.pkl / code/): loading it would "
                              f"run the code inside, so d2v refuses it. {_HOW}")
        pickles = [n for n in inner if n.endswith(".pkl")]
        if len(tops) != 1 or pickles != ["data.pkl"]:
            raise RefusedFile(f"{path} is a zip archive but not a torch checkpoint (entries: "
                              f"{', '.join(sorted(names)[:6])}{'...' if len(names) > 6 else ''}). {_HOW}")
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-pickle"
    what = {b"\x1f\x8b": "a gzip file", b"BZ": "a bzip2 file", b"7z": "a 7-zip archive", b"\xfd7": "an xz file",
            b"PK": "a damaged zip archive", b"Ra": "a rar archive"}.get(head[:2], "not a weight file d2v knows")
    raise RefusedFile(f"{path} is {what} (neither safetensors nor a torch checkpoint). {_HOW}")


def _globals_in_pickles(stream: BinaryIO, count: int) -> set[str]:
    """The names the GLOBAL opcodes of `count` consecutive pickles import, found by parsing them
    (nothing is executed; a malformed pickle is left to the unpickler to refuse)."""
    found: set[str] = set()
    try:
        for _ in range(count):
            for op, arg, _pos in pickletools.genops(stream):  # stops after each pickle's STOP
                if op.name == "GLOBAL":
                    module, name = str(arg).split(" ", 1)
                    # Protocol 2 spells Python 3 modules the Python 2 way, as torch's reader maps back.
                    if (module, name) in _compat_pickle.NAME_MAPPING:
                        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
                    found.add(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
    except Exception:
        pass
    return found


def _globals_in(f: BinaryIO, kind: str) -> set[str]:
    f.seek(0)
    if kind == "torch-zip":
        with zipfile.ZipFile(f) as z:
            name = next(n for n in z.namelist() if n.split("/")[-1] == "data.pkl")
            with z.open(name) as data:
                found = _globals_in_pickles(data, 1)
    else:
        # The plain-pickle layout: magic, version, system info, the object and the storage keys
        # are five pickles in a row, followed by raw tensor bytes.
        found = _globals_in_pickles(f, 5)
    f.seek(0)
    return found


def _record_globals(f: BinaryIO, kind: str) -> list[tuple[Any, str]]:
    from d2v.safe_load.unpickle import is_record_name, standin

    out = []
    for full in _globals_in(f, kind):
        if full in _RECORD_TYPE_REFS:
            out.append((_RECORD_TYPE_REFS[full], full))
            continue
        module, _, name = full.rpartition(".")
        if is_record_name(module, name):
            out.append((standin(module, name), full))
    return out


def _refusal(path: str, message: str) -> RefusedFile:
    """torch's message names the offending global; its advice (load with weights_only=False) is
    exactly what must not be done, so only the finding is kept."""
    m = (re.search(r"GLOBAL (\S+) was not an allowed global", message)
         or re.search(r"unsupported GLOBAL (\S+) whose module", message)
         or re.search(r"unrecognized function (.+?)(?: which belongs| *$)", message, re.M)
         or re.search(r"but got (<[^>]+>|\S+)", message))
    found = f"it references {m.group(1)}" if m else "it holds objects other than tensors and plain containers"
    return RefusedFile(f"{path}: refused: {found}, which d2v never loads (no code from a file is run). {_HOW}")


def load(path: str | os.PathLike, *, map_location: Any = "cpu", records: bool = False) -> Any:
    """Reads a weight file (see the module docstring); tensors land on map_location.
    records: turn fairseq/omegaconf/argparse configuration objects into inert stand-ins."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        kind = file_kind(f, path)
        if kind == "safetensors":
            return load_safetensors(path, device=str(map_location) if isinstance(map_location, (str, torch.device))
                                    else "cpu")
        allowed = list(inert_globals())
        if records:
            allowed += _record_globals(f, kind)
        f.seek(0)
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refusal(path, str(e)) from None
        except (RuntimeError, EOFError, ValueError) as e:
            raise RefusedFile(f"{path} could not be read as a torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); is it complete?") from None


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file (tensors only by construction); anything else is refused by name."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        if file_kind(f, path) != "safetensors":
            raise RefusedFile(f"{path} is not a safetensors file; write it with safetensors' save_file")
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except Exception as e:  # safetensors' own errors do not name the file
        raise RefusedFile(f"{path} could not be read as safetensors ({e})") from None
