"""Inert records of the configuration and logging objects a fairseq/BEiT checkpoint pickles.

A fairseq checkpoint's `cfg` is an omegaconf DictConfig (pickled with references to omegaconf
and fairseq classes), older ones carry an argparse Namespace as `args`, and `extra_state` holds
fairseq meters. d2v.safe_load builds those names as the stand-ins below, which only record what
they were given (no constructor or reducer of the original class ever runs); every other name is
refused there. `to_plain` turns a stand-in DictConfig back into dicts and lists.
"""
from __future__ import annotations

from typing import Any

# Classes that become inert records: configuration and logging objects of these packages.
STANDIN_PREFIXES = ("omegaconf.", "fairseq.", "examples.", "hydra.", "fairseq_cli.")
STANDIN_EXACT = {("argparse", "Namespace"), ("typing", "Any"), ("pathlib", "PosixPath"), ("enum", "Enum")}


def is_record_name(module: str, name: str) -> bool:
    """Whether a pickled global of a fairseq checkpoint is a configuration/logging class."""
    return module.startswith(STANDIN_PREFIXES) or (module, name) in STANDIN_EXACT or module in ("omegaconf", "fairseq")


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
        _standins[key] = type(name, (StandIn,), {"_qualname": key, "__module__": "d2v.safe_load.unpickle"})
    return _standins[key]


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
