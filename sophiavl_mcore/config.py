"""Typed configuration: dataclasses are the one source of defaults.

A recipe (YAML) is a small diff over those defaults; ``key.sub=value`` overrides from
the command line are applied on top. Unknown keys and ill-typed values fail before
anything is built, naming the dotted key, the value and what was expected. A recipe may
start from another with ``base: other.yaml`` (a path relative to the recipe).

Sections are dataclasses owned by the package that uses them, each in that package's
``config`` module (``data.config``, ``rewards.config``, ...); a job's top-level config
composes them (``trainer.grpo.config.GRPOTrainConfig`` for GRPO, ``trainer.sft.config.TRMTrainConfig`` for TRM
fine-tuning) and is passed as ``cls``. A dataclass may name keys it used to have in a
``RENAMED_KEYS`` class attribute (``{old: new}``): such a key is refused with a message
naming the new one; a ``REMOVED_KEYS`` attribute (``{old: why}``) names keys that are
gone, and such a key is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used: the message names the key and the problem."""


# ------------------------------------------------------------------ conversion


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and value type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or '<root>'}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    renamed = getattr(cls, "RENAMED_KEYS", {})
    moved = [k for k in unknown if k in renamed]
    if moved:
        raise ConfigError("; ".join(f"{_join(where, k)} is now {_join(where, renamed[k])}: "
                                    "rename the key in the recipe / override" for k in moved))
    removed = getattr(cls, "REMOVED_KEYS", {})
    gone = [k for k in unknown if k in removed]
    if gone:
        raise ConfigError("; ".join(f"{_join(where, k)} is gone: {removed[k]}; "
                                    "remove the key from the recipe / override" for k in gone))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(_join(where, k) for k in unknown)}; "
            f"valid keys at {where or '<root>'}: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or '<root>'}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Plain dict/list/scalar form of a config (for YAML dumps and TensorBoard)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, where)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} matches none of {hint}: " + "; ".join(errors))
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(hint))}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(hint)
        item_hint = args[0] if args else Any
        items = [_coerce(item_hint, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(hint, value, where)


def _coerce_scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "5e-7" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where}: cannot use {value!r} as {hint}")


# ------------------------------------------------------------------ YAML + overrides


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Load a YAML recipe, following ``base:`` chains (child keys win, merged deeply)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_merge(read_recipe(path.parent / base), data)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars/lists) to ``data``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(recipe: str | Path | None, overrides: Sequence[str] = (), *, cls: type[T]) -> T:
    """Defaults ← recipe ← overrides, validated into ``cls``."""
    data = read_recipe(recipe) if recipe is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def _deep_merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
