"""Run config files: load with `extends` chains, save keeping the user's comments, freeze into a run folder.

A file may start with `extends = "other.toml"` (relative to the file). The chain is merged table by table,
the extending file winning; arrays (datasets, targets, ...) replace, never append. Every key remembers the
file that set it, so an error names that file rather than the one passed on the command line.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from pathlib import Path
from typing import Any

import tomlkit

from engine.config.errors import ConfigError, ExtendsError, TomlSyntaxError, WrongTypeError
from engine.config.rules import validate_config
from engine.config.schema import Config, FieldInfo, config_hash, flatten, resolved_dict, schema_fields
from engine.config.strict import build
from engine.fsio import atomic_write_text

FROZEN_FILENAME = "config.resolved.toml"
EXTENDS_KEY = "extends"


class _Sources:
    """Which file set each dotted key (and each table)."""

    def __init__(self, default: str) -> None:
        self.default = default
        self.by_key: dict[str, str] = {}

    def record(self, tree: dict[str, Any], file: str, prefix: str = "") -> None:
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            self.by_key[dotted] = file
            if isinstance(value, dict):
                self.record(value, file, dotted + ".")

    def __call__(self, key: str) -> str:
        # "data.datasets[0].path" -> try it, then "data.datasets[0]", "data.datasets", "data".
        probe = key
        while probe:
            if probe in self.by_key:
                return self.by_key[probe]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return self.default


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_text(path: Path, referrer: str | None) -> str:
    """The text of a config file, or a ConfigError that says why it cannot be read and what to do.

    A missing or folder path is a mistake in whoever named it (the command line or an `extends`); a file that
    cannot be opened or is not UTF-8 is a problem of that file itself, so the error names it.
    """
    by = f" (extended by {referrer})" if referrer else ""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if referrer is None:
            raise ConfigError(str(path), "(file)", "file not found", "check the path") from None
        raise ExtendsError(
            referrer, EXTENDS_KEY, f"'{path}' does not exist", "give a path relative to the extending file"
        ) from None
    except IsADirectoryError:
        if referrer is None:
            raise ConfigError(str(path), "(file)", "is a folder, not a config file",
                              "give the path of the .toml file, e.g. presets/24gb.toml") from None
        raise ExtendsError(referrer, EXTENDS_KEY, f"'{path}' is a folder, not a config file",
                           'name the .toml file, e.g. extends = "presets/base.toml"') from None
    except PermissionError:
        raise ConfigError(str(path), "(file)", f"cannot be read: permission denied{by}",
                          f"make it readable (chmod u+r {path}) or run as a user who may read it") from None
    except OSError as exc:
        raise ConfigError(str(path), "(file)", f"cannot be read: {exc.strerror or exc}{by}",
                          "check that the file and its disk are reachable") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(str(path), "(file)",
                          f"is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line})"
                          f" cannot be decoded{by}", "save it as UTF-8 in your editor") from None


def _read_toml(path: Path, referrer: str | None) -> dict[str, Any]:
    text = _read_text(path, referrer)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TomlSyntaxError(str(path), "(syntax)", str(exc), "correct the TOML at that line and column") from None


def load_raw(path: str | os.PathLike[str]) -> tuple[dict[str, Any], _Sources]:
    """The merged TOML tree of `path` and everything it extends, with the file of each key. No typing yet."""
    path = Path(path)
    sources = _Sources(str(path))
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: list[Path] = []
    current, referrer = path, None
    while True:
        resolved = current.resolve()
        if resolved in seen:
            loop = " -> ".join(p.name for p in [*seen, resolved])
            raise ExtendsError(referrer or str(path), EXTENDS_KEY, f"extends loops: {loop}", "remove one extends")
        seen.append(resolved)
        tree = _read_toml(current, referrer)
        parent = tree.pop(EXTENDS_KEY, None)
        chain.append((current, tree))
        if parent is None:
            break
        if not isinstance(parent, str) or not parent:
            raise WrongTypeError(
                str(current), EXTENDS_KEY, f"expected a file name, got {parent!r}", 'e.g. extends = "base.toml"'
            )
        referrer = str(current)
        current = current.parent / parent
    merged: dict[str, Any] = {}
    for file, tree in reversed(chain):  # the root preset first, the file named by the user last
        merged = _merge(merged, tree)
        sources.record(tree, str(file))
    return merged, sources


def load_config(
    path: str | os.PathLike[str], dataset_size: int | None = None, require_data: bool = False,
    require_model: bool | None = None,
) -> Config:
    """The typed, validated config of `path` (following `extends`). Raises ConfigError naming file and key.
    `require_data` and `require_model` as in `check_config`."""
    tree, sources = load_raw(path)
    config = build(Config, tree, sources)
    return validate_config(config, sources, dataset_size=dataset_size, require_data=require_data,
                           require_model=require_model)


def _toml_value(value: Any) -> Any:
    """Plain value as tomlkit wants it: lists of tables become arrays of tables, regexes literal strings."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        aot = tomlkit.aot()
        for item in value:
            aot.append(item)
        return aot
    if isinstance(value, str) and "\\" in value and "'" not in value and "\n" not in value:
        return tomlkit.string(value, literal=True)  # 'blocks\.\d+' reads better than "blocks\\.\\d+"
    if isinstance(value, list) and any(isinstance(v, str) and "\\" in v for v in value):
        array = tomlkit.array()
        array.extend(_toml_value(v) for v in value)
        return array.multiline(True)
    return value


def _item_defaults(dotted: str) -> dict[str, Any] | None:
    """The default values of one table of the array of tables at `dotted` (e.g. data.datasets); None otherwise."""
    info = next((f for f in schema_fields() if f.key == dotted), None)
    if info is None or not _is_table_array(info.type):
        return None
    return resolved_dict(typing.get_args(info.type)[0]())


def _short_item(item: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A table of an array with only what differs from its defaults (its first key always: a dataset's path)."""
    first = next(iter(item), None)
    return {k: v for k, v in item.items() if k == first or defaults.get(k, object()) != v}


def _plain_value(item: Any) -> Any:
    return item.unwrap() if hasattr(item, "unwrap") else item


def _update_tables(aot: Any, items: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
    """Bring an array of tables of the file to `items` in place, so the comments in and between its tables stay:
    keys already written get their new values, other keys only when they differ from the defaults."""
    for i, item in enumerate(items):
        if i >= len(aot):
            aot.append(_short_item(item, defaults))
            continue
        table = aot[i]
        for key, value in item.items():
            if key in table:
                if _plain_value(table[key]) != value:
                    table[key] = _toml_value(value)
            elif defaults.get(key, object()) != value:
                table[key] = _toml_value(value)
    while len(aot) > len(items):
        del aot[len(aot) - 1]


def _set_dotted(doc: Any, dotted: str, value: Any, full: bool = True) -> None:
    """Set `dotted` in the TOML document. Unless `full`, a value equal to the one written is left as it is (its
    formatting and trailing comment with it) and arrays of tables are updated in place (see _update_tables)."""
    *tables, leaf = dotted.split(".")
    node = doc
    for name in tables:
        if name not in node:
            node[name] = tomlkit.table()
        node = node[name]
    defaults = None if full else _item_defaults(dotted)
    if not full and leaf in node:
        existing = node[leaf]
        if _plain_value(existing) == value:
            return
        if defaults is not None and isinstance(existing, tomlkit.items.AoT) and isinstance(value, list) and value:
            _update_tables(existing, value, defaults)
            return
    if defaults is not None and isinstance(value, list):
        value = [_short_item(item, defaults) for item in value]
    node[leaf] = _toml_value(value)


def _has_dotted(doc: Any, dotted: str) -> bool:
    node = doc
    for name in dotted.split("."):
        if not hasattr(node, "__contains__") or name not in node:
            return False
        node = node[name]
    return True


def save_config(
    config: Config,
    path: str | os.PathLike[str],
    extends: str | None = None,
    full: bool = False,
) -> Path:
    """Write `config` to `path` as TOML, keeping comments and layout of an existing file.

    Keys already in the file get their new values in place. Other keys are added only where they differ from
    what the file would inherit anyway (the `extends` chain, or the defaults), unless `full`. `extends`
    replaces the file's `extends`; None keeps the one it has. The result is checked by loading it back.
    """
    path = Path(path)
    text = _read_text(path, None) if path.exists() else ""
    doc = tomlkit.parse(text)
    if extends is not None:
        if EXTENDS_KEY in doc:
            doc[EXTENDS_KEY] = extends
        else:
            # `extends` must come before the first table, so it goes on the very first line.
            doc = tomlkit.parse(tomlkit.dumps({EXTENDS_KEY: extends}) + text)
    parent = doc.get(EXTENDS_KEY)
    if parent is not None and not full:
        inherited = flatten(resolved_dict(load_config(path.parent / str(parent))))
    else:
        inherited = flatten(resolved_dict(Config()))
    for key, value in flatten(resolved_dict(config)).items():
        if full or _has_dotted(doc, key) or inherited.get(key) != value:
            _set_dotted(doc, key, value, full)
    atomic_write_text(path, tomlkit.dumps(doc))
    load_config(path)  # a file we cannot read back is a bug here, not something to leave for the next run
    return path


def write_frozen_config(config: Config, run_dir: str | os.PathLike[str]) -> Path:
    """Write every resolved value to `run_dir/config.resolved.toml`; resume reads this copy, never the
    command line, so a run continues with exactly the settings it started with."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment("Frozen resolved config of this run. Resume reads this file; do not edit it."))
    doc.add(tomlkit.comment(f"config_hash = {config_hash(config)}"))
    for key, value in flatten(resolved_dict(config)).items():
        _set_dotted(doc, key, value)
    path = Path(run_dir) / FROZEN_FILENAME
    atomic_write_text(path, tomlkit.dumps(doc))
    return path


def read_frozen_config(run_dir: str | os.PathLike[str]) -> Config:
    path = Path(run_dir) / FROZEN_FILENAME
    tree = _read_toml(path, None)
    if EXTENDS_KEY in tree:
        raise ExtendsError(str(path), EXTENDS_KEY, "a frozen config must not extend another", "remove extends")
    sources = _Sources(str(path))
    return validate_config(build(Config, tree, sources), sources)


def _is_table_array(tp: Any) -> bool:
    return typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0])


def _comment_lines(info: FieldInfo) -> list[str]:
    lines = [info.help] if info.help else []
    if info.choices and not all(choice in info.help for choice in info.choices):
        lines.append("one of: " + ", ".join(info.choices))
    return lines


def _table_array_example(info: FieldInfo) -> list[str]:
    """Commented example of an array of tables that is empty by default, with each key's help."""
    item_type = typing.get_args(info.type)[0]
    lines = [f"{info.help}, e.g.:", f"[[{info.key}]]"]
    for sub in schema_fields(item_type):
        lines.append(f"{sub.key} = {tomlkit.item(sub.default).as_string()}  # {sub.help}")
    return lines


def render_defaults_toml(header: str = "") -> str:
    """Every key with its default and its help as a comment: the text of presets/base.toml."""
    doc = tomlkit.document()
    for line in header.splitlines():
        doc.add(tomlkit.comment(line) if line else tomlkit.nl())
    current_table: Any = None
    current_name = ""
    for info in schema_fields():
        section, leaf = info.key.rsplit(".", 1)
        if section != current_name:
            current_table = tomlkit.table()
            current_name = section
            _attach_table(doc, section, current_table)
        if _is_table_array(info.type) and not info.default:
            # An empty array of tables is best shown as a commented example of one table.
            for line in _table_array_example(info):
                current_table.add(tomlkit.comment(line))
            continue
        for line in _comment_lines(info):
            current_table.add(tomlkit.comment(line))
        current_table.add(leaf, _toml_value(info.default))
    return tomlkit.dumps(doc)


def _attach_table(doc: Any, dotted: str, table: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = doc
    for name in parents:
        node = node[name]
    node.add(leaf, table)
