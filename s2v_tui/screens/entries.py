"""Editing an array of tables of the config ([[data.datasets]], [[validation.cases]]) without a text editor.

`EntryListDialog` lists the entries and adds, edits and removes them; `EntryDialog` edits one entry, a text box
per key of the entry's schema (engine.config.schema: DatasetEntry, ValidationCase), so a key added there shows up
here without a change. Every value is checked by the engine (`with_value`, `check_config`) with the whole list in
place, and the message appears under the key it is about. Nothing reaches the session's config until Done.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Static

from engine.config import Config, ConfigError, FieldInfo, check_config, schema_fields, with_value

from s2v_tui.app_logic.config_fields import parse, show

# The keys whose value names a file or folder: a missing one is worth a word (but the config may be meant for
# another machine, so it is not refused).
PATH_KEYS = {"data.datasets": ("path", "audio_dir"), "validation.cases": ("reference", "audio")}
TITLES = {"data.datasets": "Datasets ([[data.datasets]])",
          "validation.cases": "Validation cases ([[validation.cases]])"}


def item_fields(list_key: str) -> list[FieldInfo]:
    """The keys of one entry of the array of tables at `list_key`, with their types, defaults and help."""
    info = next(f for f in schema_fields() if f.key == list_key)
    return schema_fields(typing.get_args(info.type)[0])


def entries_of(config: Config, list_key: str) -> list[dict[str, Any]]:
    node: Any = config
    for part in list_key.split("."):
        node = getattr(node, part)
    return [dataclasses.asdict(item) for item in node]


def entry_summary(list_key: str, entry: dict[str, Any]) -> str:
    """One entry in a few words, for one-line lists."""
    fields = item_fields(list_key)
    text = str(entry.get(fields[0].key, "")) or "(empty)"
    extras = [f"{f.key} {show(entry[f.key], f)}" for f in fields[1:]
              if f.key in entry and entry[f.key] != f.default and not isinstance(entry[f.key], str)]
    return text + (f" ({', '.join(extras)})" if extras else "")


def check_entries(config: Config, list_key: str, entries: list[dict[str, Any]], file: str
                  ) -> tuple[Config | None, dict[int, dict[str, str]]]:
    """The config with `entries` at `list_key`, and the engine's messages by entry index and key."""
    problems: dict[int, dict[str, str]] = {}
    try:
        candidate = with_value(config, list_key, entries, file)
    except ConfigError as exc:
        index, key = _entry_key(list_key, exc.key)
        problems.setdefault(index, {})[key] = exc.message + (f"; fix: {exc.fix}" if exc.fix else "")
        return None, problems
    for err in check_config(candidate, file):
        if err.key.startswith(list_key + "["):
            index, key = _entry_key(list_key, err.key)
            problems.setdefault(index, {}).setdefault(key, err.message + (f"; fix: {err.fix}" if err.fix else ""))
    return candidate, problems


def _entry_key(list_key: str, key: str) -> tuple[int, str]:
    """'data.datasets[1].repeats' -> (1, 'repeats'); (-1, '') for a key of the whole list."""
    rest = key.removeprefix(list_key)
    if not rest.startswith("["):
        return -1, ""
    index, _, name = rest[1:].partition("]")
    return int(index), name.lstrip(".")


class EntryDialog(ModalScreen[dict | None]):
    """One entry: a text box per key, checked as typed; Save returns the entry, Esc returns None."""

    DEFAULT_CSS = """
    EntryDialog { align: center middle; }
    EntryDialog > Vertical { width: 76; max-width: 98%; height: auto; max-height: 95%;
                             border: thick $accent; background: $surface; padding: 0 1; }
    EntryDialog VerticalScroll { height: auto; max-height: 16; }
    EntryDialog .entry-field { height: auto; border-left: blank; }
    EntryDialog .entry-field:focus-within { border-left: outer $accent; }
    EntryDialog .entry-label { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    EntryDialog .entry-note { height: auto; color: $warning; display: none; }
    EntryDialog .entry-note.shown { display: block; }
    EntryDialog .entry-error { height: auto; color: $error; display: none; }
    EntryDialog .entry-error.shown { display: block; }
    EntryDialog #entry-buttons { height: auto; align-horizontal: right; margin-top: 1; }
    EntryDialog Button { margin-left: 1; }
    """
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="entry.cancel", tooltip="Close without changing the entry"),
        Binding("ctrl+s", "save", "Save entry", id="entry.save",
                tooltip="Keep this entry (when the engine accepts it)"),
    ]

    def __init__(self, config: Config, list_key: str, entries: list[dict[str, Any]], index: int, file: str) -> None:
        super().__init__()
        self.config = config
        self.list_key = list_key
        self.entries = entries
        self.index = index  # len(entries): a new entry
        self.file = file
        self.fields = item_fields(list_key)
        defaults = {f.key: f.default for f in self.fields}
        self.entry = dict(entries[index]) if index < len(entries) else defaults
        self._typing: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        what = "new entry" if self.index >= len(self.entries) else f"entry {self.index + 1}"
        with Vertical() as box:
            box.border_title = f"{self.list_key}: {what}"
            with VerticalScroll():
                for f in self.fields:
                    with Vertical(classes="entry-field"):
                        yield Static(f"[b]{f.key}[/]  [dim]{f.help}[/]", classes="entry-label")
                        yield Input(show(self.entry.get(f.key, f.default), f), id=f"entry-{f.key}", compact=True,
                                    tooltip=f.help)
                        yield Static("", id=f"note-{f.key}", classes="entry-note", markup=False)
                        yield Static("", id=f"error-{f.key}", classes="entry-error", markup=False)
            with Horizontal(id="entry-buttons"):
                yield Button("Save entry", id="entry-save", variant="primary", tooltip="Keep this entry (ctrl+s)")
                yield Button("Cancel", id="entry-cancel", tooltip="Close without changing it (esc)")

    def on_mount(self) -> None:
        self.query_one(f"#entry-{self.fields[0].key}", Input).focus()
        self.validate()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        key = (event.input.id or "").removeprefix("entry-")
        info = next((f for f in self.fields if f.key == key), None)
        if info is None:
            return
        try:
            self.entry[key] = parse(event.value, dataclasses.replace(info, key=f"{self.list_key}.{key}"), self.file)
        except ConfigError as exc:
            self._typing[key] = exc.message + (f"; fix: {exc.fix}" if exc.fix else "")
        else:
            self._typing.pop(key, None)
        self.validate()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def _candidate(self) -> list[dict[str, Any]]:
        entries = list(self.entries)
        if self.index < len(entries):
            entries[self.index] = dict(self.entry)
        else:
            entries.append(dict(self.entry))
        return entries

    def validate(self) -> dict[str, str]:
        """Show the messages under their keys; returns them (empty: the engine accepts the entry)."""
        _, problems = check_entries(self.config, self.list_key, self._candidate(), self.file)
        mine = {**problems.get(self.index, {}), **self._typing}
        for f in self.fields:
            error = self.query_one(f"#error-{f.key}", Static)
            error.update(mine.get(f.key, ""))
            error.set_class(f.key in mine, "shown")
            note = self.query_one(f"#note-{f.key}", Static)
            missing = self._missing_path(f.key)
            note.update(missing)
            note.set_class(bool(missing) and f.key not in mine, "shown")
        return mine

    def _missing_path(self, key: str) -> str:
        value = self.entry.get(key)
        if key not in PATH_KEYS.get(self.list_key, ()) or not isinstance(value, str) or not value:
            return ""
        if Path(value).expanduser().exists():
            return ""
        return f"{value} does not exist on this machine (kept: the config may be meant for another one)"

    def action_save(self) -> None:
        problems = self.validate()
        if problems:
            first = next(iter(problems))
            self.notify(f"{first}: {problems[first]}", title="Not saved: fix the entry first", severity="error")
            return
        self.dismiss(dict(self.entry))

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "entry-save":
            self.action_save()
        else:
            self.action_cancel()


class EntryListDialog(ModalScreen[list | None]):
    """The entries of one array of tables: add, edit, remove; Done returns the list, Esc returns None."""

    DEFAULT_CSS = """
    EntryListDialog { align: center middle; }
    EntryListDialog > Vertical { width: 78; max-width: 98%; height: auto; max-height: 95%;
                                 border: thick $accent; background: $surface; padding: 0 1; }
    EntryListDialog DataTable { height: auto; max-height: 10; margin: 1 0 0 0; }
    EntryListDialog #entries-hint { height: auto; color: $text-muted; }
    EntryListDialog #entries-problems { height: auto; color: $error; }
    EntryListDialog #entries-buttons { height: auto; margin-top: 1; }
    EntryListDialog #entries-buttons Button { margin-right: 1; min-width: 8; }
    """
    BINDINGS = [
        Binding("a", "add", "Add", id="entries.add", tooltip="Add an entry"),
        Binding("e", "edit", "Edit", id="entries.edit", tooltip="Edit the highlighted entry (or Enter)"),
        Binding("delete", "remove", "Remove", id="entries.remove", tooltip="Remove the highlighted entry"),
        Binding("ctrl+s", "done", "Done", id="entries.done", tooltip="Keep these entries in the run config"),
        Binding("escape", "cancel", "Cancel", id="entries.cancel", tooltip="Close and forget the changes made here"),
    ]

    def __init__(self, config: Config, list_key: str, file: str, add_path: str = "") -> None:
        super().__init__()
        self.config = config
        self.list_key = list_key
        self.file = file
        self.entries = entries_of(config, list_key)
        self.fields = item_fields(list_key)
        self._add_path = add_path  # a folder to offer in a new entry (the Dataset screen's box)

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = TITLES.get(self.list_key, self.list_key)
            yield Static("a: add  e/Enter: edit  Del: remove  ctrl+s: done  esc: cancel", id="entries-hint")
            table = DataTable(id="entries", cursor_type="row", zebra_stripes=True)
            table.add_columns("#", *(f.key for f in self.fields))
            yield table
            yield Static("", id="entries-problems", markup=False)
            with Horizontal(id="entries-buttons"):
                yield Button("Add", id="entries-add", tooltip="Add an entry (a)")
                yield Button("Edit", id="entries-edit", tooltip="Edit the highlighted entry (e)")
                yield Button("Remove", id="entries-remove", variant="error", tooltip="Remove it (Del)")
                yield Button("Done", id="entries-done", variant="primary", tooltip="Keep the list (ctrl+s)")
                yield Button("Cancel", id="entries-cancel", tooltip="Forget the changes (esc)")

    def on_mount(self) -> None:
        self.refresh_table()
        self.query_one("#entries", DataTable).focus()

    def refresh_table(self, cursor: int | None = None) -> None:
        table = self.query_one("#entries", DataTable)
        table.clear()
        for i, entry in enumerate(self.entries):
            table.add_row(str(i + 1), *(show(entry.get(f.key, f.default), f) for f in self.fields))
        if self.entries:
            table.move_cursor(row=min(cursor if cursor is not None else table.cursor_row, len(self.entries) - 1))
        _, problems = check_entries(self.config, self.list_key, self.entries, self.file)
        lines = [f"entry {i + 1} {key}: {msg}" for i, by_key in sorted(problems.items()) for key, msg in by_key.items()]
        self.query_one("#entries-problems", Static).update(
            "\n".join(lines) if lines else ("" if self.entries else "no entries yet: a adds one"))

    def _edit(self, index: int) -> None:
        def edited(entry: dict | None) -> None:
            if entry is None:
                return
            if index < len(self.entries):
                self.entries[index] = entry
            else:
                self.entries.append(entry)
            self.refresh_table(cursor=index)

        dialog = EntryDialog(self.config, self.list_key, self.entries, index, self.file)
        if index >= len(self.entries) and self._add_path and not any(
                e.get(self.fields[0].key) == self._add_path for e in self.entries):
            dialog.entry[self.fields[0].key] = self._add_path
        self.app.push_screen(dialog, edited)

    def action_add(self) -> None:
        self._edit(len(self.entries))

    def action_edit(self) -> None:
        table = self.query_one("#entries", DataTable)
        if self.entries:
            self._edit(table.cursor_row)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self._edit(event.cursor_row)

    def action_remove(self) -> None:
        table = self.query_one("#entries", DataTable)
        if self.entries:
            row = table.cursor_row
            del self.entries[row]
            self.refresh_table(cursor=row)

    def action_done(self) -> None:
        candidate, problems = check_entries(self.config, self.list_key, self.entries, self.file)
        if candidate is None or problems:
            self.notify("An entry is not valid yet: edit it (the list shows why).", severity="error")
            return
        self.dismiss(self.entries)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        action = (event.button.id or "").removeprefix("entries-")
        getattr(self, f"action_{action}")()
