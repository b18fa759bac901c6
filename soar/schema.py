"""Strict conversion of plain YAML data into the frozen settings dataclasses.

A settings dataclass is declared beside the code that takes it (``soar.rollout.SoarConfig``,
``soar.train_config.TrainConfig``, ...); every field has a default (the embedded tiny profile) and a
one-line comment with meaning and units, and range checks live in its ``__post_init__`` as
``check(ok, key, message)``, so a value is checked however the object is made.

``build(cls, data, where)`` checks every key against the dataclass fields (unknown keys are
errors, absent keys keep their default), checks every value against the field's type annotation
(``int``, ``float``, ``str``, ``bool``, ``X | None``, ``Literal[...]``, ``list[X]``,
``dict[str, X]`` and nested dataclasses; numbers must be finite, YAML's ``.nan`` and ``.inf`` are
errors), and names the offending key as a dotted path, also for
the ``__post_init__`` checks. Lists become tuples and mappings read-only mappings (frozen all the way).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value is unknown, missing, of the wrong type or out of range; ``key``: the field a
    ``check`` in ``__post_init__`` names (``build`` then adds the value it got)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str, base: Any = None) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, base if isinstance(base, tp) else None)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where, base)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(c) for c in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = get_args(tp)
        return tuple(_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = get_args(tp)
        return types.MappingProxyType({str(k): _convert(val_tp, v, f"{where}.{k}") for k, v in value.items()})
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf are floats; no setting means either
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def build(cls: type, data: Any, where: str, base: Any = None) -> Any:
    """Build dataclass ``cls`` from mapping ``data``; ``where`` is the dotted path for errors.

    An absent key keeps its value in ``base`` (an instance of ``cls``), else the field's default; a nested
    section given in part is completed the same way from its own base (e.g. ``pretrain`` from the
    pretraining defaults, not the ``train`` ones). A mapping-typed field given in ``data`` replaces the
    default mapping as a whole.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known keys: {', '.join(fields)})")
    values = {}
    for name, field in fields.items():
        key = f"{where}.{name}"
        default = getattr(base, name) if base is not None else _default(field)
        if name not in data:
            if default is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing key")
            values[name] = default
            continue
        values[name] = _convert(hints[name], data[name], key, default)
    try:
        return cls(**values)
    except ConfigError as err:  # a __post_init__ check: it names the key, we add the section and the value
        got = f", got {values[err.key]!r}" if err.key in values else ""
        raise ConfigError(f"{where}.{err}{got}") from None


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("key: message")`` unless ``ok`` (``build`` prefixes the section's dotted path)."""
    if not ok:
        raise ConfigError(f"{key}: {message}", key)


def at_least(settings: Any, minimum: float, *keys: str) -> None:
    """``check`` that each of ``keys`` of ``settings`` is null or >= ``minimum``."""
    for key in keys:
        value = getattr(settings, key)
        check(value is None or value >= minimum, key, f"must be >= {minimum}")


def positive(settings: Any, *keys: str) -> None:
    """``check`` that each of ``keys`` of ``settings`` is null or > 0."""
    for key in keys:
        value = getattr(settings, key)
        check(value is None or value > 0, key, "must be > 0")


__all__ = ["ConfigError", "at_least", "build", "check", "positive"]
