"""The config form's plumbing without widgets: topics, how a value is shown in a text box and read back.

Values are typed as TOML (`0.0001`, `[832, 480]`, `true`); a text key takes the text as it is, so nobody
has to type quotes around a path. The engine (`with_value`, `check_config`) does every check.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from typing import Any

import tomlkit

from engine.config import ConfigError, FieldInfo, schema_fields

# Tabs of the form, in order: topic title -> top-level sections of the config it gathers.
TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Model", ("model",)),
    ("Data", ("data",)),
    ("LoRA", ("lora",)),
    ("Optimisation", ("optim", "train")),
    # The seed's experimental training methods, each off by default.
    ("Methods", ("tread", "crepa", "rollout")),
    ("Memory", ("memory", "distributed")),
    ("Validation", ("validation",)),
    ("Output", ("output", "checkpoint", "logging")),
)


def topic_fields() -> list[tuple[str, list[FieldInfo]]]:
    fields = schema_fields()
    return [(title, [f for f in fields if f.key.split(".", 1)[0] in sections]) for title, sections in TOPICS]


def is_table_list(info: FieldInfo) -> bool:
    """Arrays of tables (datasets, validation cases) are edited in the file, not in one text box."""
    tp = info.type
    return typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0])


def is_text(info: FieldInfo) -> bool:
    return info.type is str


def widget_id(key: str) -> str:
    return "f-" + key.replace(".", "--")


def key_of(widget_id_: str) -> str:
    return widget_id_.removeprefix("f-").replace("--", ".")


def show(value: Any, info: FieldInfo) -> str:
    if is_text(info):
        return str(value)
    if isinstance(value, tuple):
        value = list(value)
    return tomlkit.item(value).as_string()


def parse(text: str, info: FieldInfo, file: str) -> Any:
    """The typed value the user means by `text`; ConfigError (naming the key) when it is not TOML."""
    if is_text(info):
        return text
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        example = show(info.default, info)
        raise ConfigError(file, info.key, f"'{text}' is not a value of this type",
                          f"write it like {example}") from None


_INDEX = re.compile(r"\[\d+\]")


def field_of_error_key(key: str) -> str:
    """'optim.betas[0]' -> 'optim.betas'; 'data.datasets[1].path' -> 'data.datasets'."""
    m = _INDEX.search(key)
    return key[: m.start()] if m else key
