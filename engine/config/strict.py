"""Strict conversion of parsed TOML (plain dicts) into the typed config dataclasses.

Every key must exist in the schema and every value must have the schema's type; the first problem raises a
`ConfigError` that names the file that set the key, the full dotted key and the fix. `origin(key)` tells
which file of an `extends` chain set a key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
import typing
from collections.abc import Callable
from typing import Any, Literal

from engine.config.errors import BadValueError, ConfigError, UnknownKeyError, WrongTypeError
from engine.config.rules import leaf_problems
from engine.config.schema import Config, flatten, resolved_dict, type_hints

Origin = Callable[[str], str]

# Schema-wide leaf keys, to point a key written in the wrong section at the right one.
_ALL_KEYS: list[str] | None = None


def _all_keys() -> list[str]:
    global _ALL_KEYS
    if _ALL_KEYS is None:
        _ALL_KEYS = list(flatten(resolved_dict(Config())))
    return _ALL_KEYS


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"array of {type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        return f"array of {len(typing.get_args(tp))} numbers"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {int: "integer", float: "number", bool: "boolean (true/false)", str: "string"}.get(tp, str(tp))


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return repr(value)


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind.get(type(value), type(value).__name__)} {text}"


def _unknown_key(name: str, key: str, valid: list[str], origin: Origin) -> UnknownKeyError:
    section = key.rsplit(".", 1)[0] if "." in key else ""
    if not section:
        valid = [*valid, "extends"]  # read by the loader before typing, but a typo of it lands here
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        fix = f"did you mean '{(section + '.') if section else ''}{close[0]}'?"
    else:
        elsewhere = [k for k in _all_keys() if k.rsplit(".", 1)[-1] == name]
        if elsewhere:
            fix = f"'{name}' belongs in [{elsewhere[0].rsplit('.', 1)[0]}] ('{elsewhere[0]}')"
        else:
            fix = f"remove it; valid keys here: {', '.join(valid)}"
    return UnknownKeyError(origin(key), key, f"unknown key '{name}'", fix)


def _wrong_type(key: str, tp: Any, value: Any, default: Any, origin: Origin) -> WrongTypeError:
    example = f"{key.rsplit('.', 1)[-1]} = {_toml_literal(default)}" if default is not None else ""
    name = type_name(tp)
    article = "an" if name[0] in "aeiou" else "a"
    fix = f"write {article} {name}" + (f", e.g. {example}" if example else "")
    return WrongTypeError(origin(key), key, f"expected {type_name(tp)}, got {_describe(value)}", fix)


def convert(tp: Any, value: Any, key: str, origin: Origin, default: Any = None) -> Any:
    """`value` (from TOML) as type `tp`, or a ConfigError naming `key`."""
    origin_tp = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _wrong_type(key, tp, value, None, origin)
        return build(tp, value, origin, key + ".")
    if origin_tp is Literal:
        allowed = typing.get_args(tp)
        if not isinstance(value, str):
            raise _wrong_type(key, tp, value, default, origin)
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
            fix = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(allowed)}"
            raise BadValueError(origin(key), key, f"'{value}' is not one of {', '.join(allowed)}", fix)
        return value
    if origin_tp is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _wrong_type(key, tp, value, default, origin)
        return [convert(item_tp, v, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if origin_tp is tuple:
        item_tps = typing.get_args(tp)
        if not isinstance(value, list) or len(value) != len(item_tps):
            raise _wrong_type(key, tp, value, default, origin)
        return tuple(convert(t, v, f"{key}[{i}]", origin) for i, (t, v) in enumerate(zip(item_tps, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong_type(key, tp, value, default, origin)
        return value
    if tp is int:
        # bool is an int in Python but `rank = true` is surely a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(key, tp, value, default, origin)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(key, tp, value, default, origin)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _wrong_type(key, tp, value, default, origin)
        return value
    raise TypeError(f"schema type {tp!r} of {key} is not supported")  # a bug in the schema, not user input


def build(cls: type, data: dict[str, Any], origin: Origin, prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a TOML table; missing keys take their defaults."""
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    plain_defaults = resolved_dict(cls())
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(name, key, list(fields), origin)
        default = None if dataclasses.is_dataclass(hints[name]) else plain_defaults.get(name)
        kwargs[name] = _judged(key, convert(hints[name], value, key, origin, default), origin)
    return cls(**kwargs)


def _judged(key: str, value: Any, origin: Origin) -> Any:
    """`value` unchanged, or the BadValueError of the first rule it breaks on its own (rules.leaf_problems)."""
    for bad_key, message, fix in leaf_problems(key, value):
        raise BadValueError(origin(bad_key), bad_key, message, fix)
    return value


def with_value(config: Config, key: str, value: Any, file: str = "<input>") -> Config:
    """A copy of `config` with dotted `key` set to `value` (a TOML-typed value), converted and type-checked
    like a file would be. For the TUI form and command-line overrides; run `check_config` on the result."""
    parts = key.split(".")
    new = copy.deepcopy(config)
    node: Any = new
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise WrongTypeError(file, key, f"'{'.'.join(parts[:depth])}' is not a table", "name a leaf key")
        fields = [f.name for f in dataclasses.fields(node)]
        if name not in fields:
            raise _unknown_key(name, ".".join(parts[: depth + 1]), fields, lambda _k: file)
        if depth == len(parts) - 1:
            tp = type_hints(type(node))[name]
            default = resolved_dict(type(node)()).get(name)
            setattr(node, name, _judged(key, convert(tp, value, key, lambda _k: file, default), lambda _k: file))
        else:
            node = getattr(node, name)
    return new


def parse_override(text: str, file: str = "<command line>") -> tuple[str, Any]:
    """'optim.lr=2e-4' -> ("optim.lr", 2e-4): the value is read as TOML; a bare word is taken as a string."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(file, text, "is not KEY=VALUE", "write e.g. optim.lr=2e-4")
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw
