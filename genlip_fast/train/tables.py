"""Nested dataclasses filled from TOML tables and ``--section.key=value`` strings (the mechanism under
:func:`genlip_fast.train.config.load_config`).

Each value is checked, and gently converted (a command-line string to the field's int, float, bool, tuple, list of
tables or dict), against its field's type; an unknown key or a value of the wrong type is a :class:`ConfigError`
naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing


class ConfigError(ValueError):
    """A configuration value, key or file that cannot be used; the message names it."""


def _coerce(value, tp, where: str):
    """Check (and gently convert) a TOML or CLI value to the field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a {tp}")
    if origin is list:
        return _coerce_list(value, typing.get_args(tp)[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: {value!r} is not a {tp}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"{where}: {value!r} is not a bool")
    if tp in (int, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (tp is float or isinstance(value, int)):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: {value!r} is not {'an int' if tp is int else 'a float'}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {value!r} is not a string")
    if tp is dict:  # a TOML table, or JSON on the command line
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError as e:
                raise ConfigError(f"{where}: {value!r} is not a JSON object ({e})") from None
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: {value!r} is not a table")
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _coerce_list(value, item_tp, where: str) -> list:
    """A list of dataclass tables: a TOML array of tables, or (from the command line) its TOML text."""
    if isinstance(value, str):
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where}: {value!r} is not a TOML array of tables ({e}); e.g. "
                              f"--{where}='[{{path=\"a/*.tar\", weight=2}}, {{path=\"b/*.tar\"}}]'") from None
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {value!r} is not a list of tables")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}[{i}] must be a table, got {item!r}")
        obj = item_tp()
        apply_table(obj, item, f"{where}[{i}].")
        out.append(obj)
    return out


def apply_table(obj, values: dict, where: str = "") -> None:
    """Set the fields of dataclass ``obj`` (nested dataclasses in place) from a TOML table; ``where`` prefixes the
    names in errors."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key {where}{key!r}; known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a table, got {value!r}")
            apply_table(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}{key}"))


def override_table(item: str) -> tuple[str, dict]:
    """``--section.key=value`` -> ``("section.key", {"section": {"key": "value"}})`` (the value still a string)."""
    if not item.startswith("--") or "=" not in item:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    dotted, value = item[2:].split("=", 1)
    *parents, key = dotted.split(".")
    table: dict = {key: value}
    for p in reversed(parents):
        table = {p: table}
    return dotted, table


def dotted_keys(table: dict, prefix: str = "") -> set[str]:
    """``{"data.train_shards", ...}``: the keys a TOML table sets (a list of tables counts as one key)."""
    out = set()
    for k, v in table.items():
        out |= dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def numeric_fields(obj, prefix: str = "") -> dict[str, object]:
    """``{"section.key": value}`` for every int / float / tuple-of-numbers field (nested dataclasses walked; a list of
    tables gives ``"section.list.key"``: the tuple of that field's values over the list)."""
    out = {}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(numeric_fields(value, f"{prefix}{f.name}."))
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            item_tp = typing.get_args(tp)[0]
            for key in numeric_fields(item_tp()):
                out[f"{prefix}{f.name}.{key}"] = tuple(getattr(x, key) for x in value)
            continue
        kinds = set(typing.get_args(tp)) | {tp}
        if kinds & {int, float} or typing.get_origin(tp) is tuple and set(typing.get_args(tp)) <= {int, float}:
            out[f"{prefix}{f.name}"] = value
    return out


__all__ = ["ConfigError", "apply_table", "dotted_keys", "numeric_fields", "override_table"]
