"""YAML files and `key=value` overrides that carry only differences from a preset.

Values are coerced to the field's declared type, unknown keys are errors that suggest the
closest field name, and `to_dict`/`from_dict` round-trip a config (the resolved config written
next to every run). YAML is imported lazily so the config package stays standard-library-only.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import types
import typing
from typing import Any, Iterable

from d2v.config.schema import D2vConfig


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_literal(text: str) -> Any:
    low = text.strip().lower()
    if low in ("null", "none", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    return text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and _parse_literal(value) is None)):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{key}: cannot use {value!r} ({'; '.join(errors)})")
    if origin is tuple:
        if isinstance(value, str):
            value = _parse_literal(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, str):
            value = _parse_literal(value)
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            value = _parse_literal(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN and infinities turn weights and schedules into NaN
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return hint(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is type(None):
        if value is not None:
            raise ValueError(f"{key}: expected null")
        return None
    return value


def _unknown(key: str, name: str, obj: Any) -> KeyError:
    names = [f.name for f in dataclasses.fields(obj)]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; fields here: {', '.join(names)}"
    return KeyError(f"unknown config key {key!r}{hint}")


def set_value(cfg: D2vConfig, key: str, value: Any) -> None:
    """Sets a dotted key such as `model.audio.conv_pos_depth`, coercing `value` (str or parsed)."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown(key, part, obj)
        hint = _hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                if not isinstance(value, dict):
                    raise ValueError(f"{key} is a section; set its fields (e.g. {key}.<field>=...)")
                merge_dict(getattr(obj, part), value, prefix=key)
            else:
                setattr(obj, part, _coerce(value, hint, key))
        else:
            obj = getattr(obj, part)


def merge_dict(section: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Applies a nested dict (from YAML) onto a config section."""
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in {f.name for f in dataclasses.fields(section)}:
            raise _unknown(key, name, section)
        hint = _hints(type(section))[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{key} is a section and needs a mapping, got {value!r}")
            merge_dict(getattr(section, name), value, key)
        else:
            setattr(section, name, _coerce(value, hint, key))


def apply_overrides(cfg: D2vConfig, overrides: Iterable[str]) -> D2vConfig:
    """Applies `key=value` strings in order; returns cfg."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
        key, text = item.split("=", 1)
        # Raw text: each field's type decides how to read it ("none" stays a string for str fields).
        set_value(cfg, key.strip(), text.strip())
    return cfg


def load_yaml(cfg: D2vConfig, path: str) -> D2vConfig:
    """Merges a YAML file of differences into cfg."""
    import yaml

    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:  # a syntax error, or a tag such as !!python/object (never run)
            where = getattr(err, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise ValueError(f"{path}{at} is not a plain YAML mapping: {getattr(err, 'problem', None) or err}; "
                             f"write sections of key: value settings") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config sections")
    merge_dict(cfg, data)
    return cfg


def to_dict(cfg: D2vConfig) -> dict[str, Any]:
    """A JSON/YAML-safe nested dict (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict[str, Any]) -> D2vConfig:
    """Rebuilds a config from `to_dict` output (e.g. a checkpoint's resolved config)."""
    cfg = D2vConfig()
    merge_dict(cfg, data)
    return cfg
