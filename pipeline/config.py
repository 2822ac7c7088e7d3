"""Typed config trees: dataclasses from plain dicts, dotted overrides, one error type.

Every component owns a dataclass next to its code; this module only turns nested
dicts (from YAML or JSON) into those dataclasses, strictly: an unknown key, a
missing required key or a value of the wrong type raises `PipelineError` naming
the dotted key, so a typo in a preset fails at start-up rather than being ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields."""
    if not isinstance(data, dict):
        raise PipelineError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # Every problem of the tree is collected before raising, so one run (or --dry-run) lists
    # them all instead of making the user fix them one at a time; one per line.
    errors = []
    unknown = sorted(set(data) - set(fields))
    if unknown:
        errors.append(f"unknown config key(s) {', '.join(_join(where, k) for k in unknown)}; "
                      f"valid keys here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        try:
            kwargs[name] = _coerce(hints[name], value, _join(where, name))
        except PipelineError as exc:
            errors.append(str(exc))
    if errors:
        raise PipelineError("\n".join(errors))
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise PipelineError(f"{where or cls.__name__}: {exc}") from None
    return obj


def check(problems: list[str]) -> None:
    """Raise one `PipelineError` listing every problem (one per line), if there are any:
    what a config's `__post_init__` calls after checking all of its fields."""
    if problems:
        raise PipelineError("\n".join(problems))


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (JSON/YAML serialisable)."""
    return dataclasses.asdict(obj)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (`{"train": {"lr": 1}}` -> `{"train.lr": 1}`)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict (values parsed as YAML scalars)."""
    import yaml

    out = _deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PipelineError(f"override {item!r} is not of the form dotted.key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PipelineError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise PipelineError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise PipelineError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise PipelineError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value
