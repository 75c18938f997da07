"""Reading fairseq/BEiT checkpoints without fairseq or omegaconf, and without running their code.

A fairseq checkpoint is a torch pickle whose `cfg` is an omegaconf DictConfig (pickled with
references to omegaconf and fairseq classes) and whose `extra_state` holds fairseq meters. The
restricted unpickler resolves those classes to inert stand-ins that only record what they were
given, allows the few torch/numpy/collections callables a tensor file needs, and refuses every
other global (os.system, builtins.eval, subprocess...) by name. `to_plain` turns a stand-in
DictConfig back into dicts and lists.
"""
from __future__ import annotations

import _compat_pickle
import pickle
import types
from typing import Any

import torch

# Classes that become inert records: configuration and logging objects of these packages.
STANDIN_PREFIXES = ("omegaconf.", "fairseq.", "examples.", "hydra.", "fairseq_cli.")
STANDIN_EXACT = {("argparse", "Namespace"), ("typing", "Any"), ("pathlib", "PosixPath"), ("enum", "Enum")}
# Callables a torch/numpy checkpoint legitimately reconstructs with.
ALLOWED = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("builtins", "complex"), ("builtins", "bytearray"), ("builtins", "object"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"),
    ("builtins", "str"), ("builtins", "bool"), ("builtins", "bytes"), ("copyreg", "_reconstructor"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch", "Size"), ("torch", "device"),
    ("torch", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
}
_STORAGES = {"FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "IntStorage",
             "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage"}
_TORCH_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


class StandIn:
    """An inert record of a pickled object whose class is not importable (or not trusted)."""

    _qualname = "?"
    # Pickle's NEWOBJ path creates instances without __init__: class-level defaults.
    args: tuple = ()
    kwargs: dict = {}
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in {self._qualname}>"


_standins: dict[str, type] = {}


def standin(module: str, name: str) -> type:
    """One stand-in class per qualified name, so `isinstance` and reprs tell them apart."""
    key = f"{module}.{name}"
    if key not in _standins:
        # Distinct per name; never the original class, never executing its code.
        _standins[key] = type(name, (StandIn,), {"_qualname": key, "__module__": "d2v.interop.unpickle"})
    return _standins[key]


class RefusedPickle(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles name Python 2 modules (__builtin__, copy_reg): the standard mapping.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and (name in _STORAGES or name in _TORCH_DTYPES):
            return getattr(torch, name)
        if module.startswith(STANDIN_PREFIXES) or (module, name) in STANDIN_EXACT or module in ("omegaconf", "fairseq"):
            return standin(module, name)
        raise RefusedPickle(f"the checkpoint references {module}.{name}, which d2v does not load (only tensors, "
                            f"containers and fairseq/omegaconf configuration records are allowed)")


# torch.load(pickle_module=...) needs a module-like object with Unpickler and load.
restricted_pickle = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler,
    load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
    __name__="d2v.interop.unpickle.restricted_pickle",
)


def load_checkpoint(path: str) -> Any:
    """torch.load through the restricted unpickler (tensors land on the CPU)."""
    return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)


_MISSING = "???"


def to_plain(obj: Any) -> Any:
    """omegaconf stand-ins (DictConfig, ListConfig, value nodes), Namespaces and enums -> plain Python."""
    if isinstance(obj, StandIn):
        state = obj.state
        if isinstance(state, dict) and "_content" in state:
            content = state["_content"]
            if isinstance(content, dict):
                return {str(k): to_plain(v) for k, v in content.items()}
            if isinstance(content, (list, tuple)):
                return [to_plain(v) for v in content]
            return None if content in (None, _MISSING) else content
        if isinstance(state, dict) and "_val" in state:
            return to_plain(state["_val"])
        if isinstance(state, dict):  # argparse.Namespace and other plain records
            return {str(k): to_plain(v) for k, v in state.items() if not str(k).startswith("_")}
        if obj.args:  # an enum member pickled as Class(value)
            return to_plain(obj.args[0])
        return None
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj
