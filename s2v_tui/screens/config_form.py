"""Config: the run config as a form in topic tabs, checked by the engine as you type, saved as TOML that
keeps the file's comments, with the difference from the chosen preset."""
from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.widgets import Button, Footer, Input, Select, Static, Switch, TabbedContent, TabPane

from engine.config import ConfigError, check_config, diff, save_config, with_value

from s2v_tui.app_handle import app_of
from s2v_tui.app_logic.config_fields import (field_of_error_key, is_table_list, key_of, parse, show,
                                             topic_fields, widget_id)
from s2v_tui.screens.base import AppScreen
from s2v_tui.widgets.nav import NavBar

DEFAULT_SAVE_NAME = "s2v-run.toml"


class ConfigScreen(AppScreen):
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", id="config.save", tooltip="Write the config to the TOML file"),
        Binding("ctrl+d", "show_diff", "Diff", id="config.diff", tooltip="What differs from the chosen preset"),
        Binding("n", "app.new_run", "New run", id="config.new_run",
                tooltip="Model, dataset folder and run name in one dialog (or a tiny demo to try the app)"),
    ]
    DEFAULT_CSS = """
    ConfigScreen #save-row { height: 1; margin: 0 1; }
    ConfigScreen #save-path { width: 1fr; }
    ConfigScreen #save { min-width: 8; }
    ConfigScreen .field { height: auto; padding: 0 1 0 0; border-left: blank; }
    ConfigScreen .field:focus-within { border-left: outer $accent; }
    ConfigScreen .switch-row, ConfigScreen .list-row { height: auto; }
    ConfigScreen .switch-state { width: auto; padding: 0 1; }
    ConfigScreen .list-row Static { width: 1fr; padding: 0 1 0 0; }
    ConfigScreen .list-row Button { min-width: 10; }
    ConfigScreen #topics { height: 1fr; }
    ConfigScreen TabPane { height: 1fr; padding: 0; }
    ConfigScreen TabPane > VerticalScroll { height: 1fr; }
    ConfigScreen .field-label { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    ConfigScreen .field Input, ConfigScreen .field Select { width: 1fr; }
    ConfigScreen .field Switch { width: auto; }
    ConfigScreen .field-error { height: auto; color: $error; display: none; }
    ConfigScreen .field-error.shown { display: block; }
    ConfigScreen #diff { padding: 0 1; }
    ConfigScreen #config-status { height: 1; padding: 0 1; }
    """

    AUTO_FOCUS = "#topics Tabs"

    def __init__(self) -> None:
        super().__init__()
        self._infos = {info.key: info for _, infos in topic_fields() for info in infos}
        self._typing_errors: dict[str, str] = {}  # keys whose text is not a valid value yet
        self._syncing = False

    def compose(self) -> ComposeResult:
        session = app_of(self).session
        yield NavBar("config")
        with Horizontal(id="save-row"):
            yield Input(str(session.config_path or DEFAULT_SAVE_NAME), id="save-path", compact=True,
                        tooltip="TOML file to write; an existing file keeps its comments")
            yield Button("Save", id="save", compact=True, variant="primary", tooltip="Save (ctrl+s)")
        yield Static("", id="config-status")
        with TabbedContent(id="topics"):
            for title, infos in topic_fields():
                with TabPane(title, id=f"topic-{title.lower()}"):
                    with VerticalScroll():
                        for info in infos:
                            yield from self._field(info)
            with TabPane("Diff", id="topic-diff"):
                with VerticalScroll():
                    yield Static("", id="diff", markup=False)
        yield Footer()

    def _field(self, info) -> ComposeResult:
        value = self._value(info.key)
        with Vertical(classes="field"):
            yield Static(f"[b]{info.key}[/]  [dim]{info.help}[/]", classes="field-label")
            wid = widget_id(info.key)
            if is_table_list(info):
                with Horizontal(classes="list-row"):
                    yield Static(self._table_list_text(info.key), id=wid, markup=False)
                    yield Button("Edit...", id=f"edit-{wid}", compact=True,
                                 tooltip=f"Add, remove and edit the [[{info.key}]] entries")
            elif info.type is bool:
                with Horizontal(classes="switch-row"):
                    yield Switch(bool(value), id=wid, tooltip=info.help)
                    # The switch's position is a colour change only: the word keeps it readable under NO_COLOR.
                    yield Static(_on_off(bool(value)), id=f"state-{wid}", classes="switch-state")
            elif info.choices and not isinstance(info.default, list):
                yield Select([(c, c) for c in info.choices], value=value, allow_blank=False, id=wid,
                             compact=True, tooltip=info.help)
            else:
                yield Input(show(value, info), id=wid, compact=True, tooltip=info.help)
            yield Static("", classes="field-error", id=f"err-{wid}", markup=False)

    def _value(self, key: str):
        node = app_of(self).session.config
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def _table_list_text(self, key: str) -> str:
        from s2v_tui.screens.entries import entries_of, entry_summary

        items = [entry_summary(key, e) for e in entries_of(app_of(self).session.config, key)]
        return f"{len(items)}: {', '.join(items)}" if items else "none yet"

    def on_mount(self) -> None:
        self.validate_all()

    @on(Button.Pressed, ".list-row Button")
    def _edit_list(self, event: Button.Pressed) -> None:
        key = key_of((event.button.id or "").removeprefix("edit-"))
        app_of(self).action_edit_list(key)

    def config_changed(self) -> None:
        self.on_screen_resume()

    def on_screen_resume(self) -> None:
        """Another screen or a dialog may have changed the config (a preset, the datasets): show its values."""
        self._syncing = True
        try:
            for key, info in self._infos.items():
                widget = self.query_one(f"#{widget_id(key)}")
                value = self._value(key)
                if isinstance(widget, Switch):
                    widget.value = bool(value)
                    self.query_one(f"#state-{widget_id(key)}", Static).update(_on_off(bool(value)))
                elif isinstance(widget, Select):
                    widget.value = value
                elif isinstance(widget, Input):
                    if key not in self._typing_errors:
                        widget.value = show(value, info)
                else:
                    widget.update(self._table_list_text(key))  # type: ignore[attr-defined]
        finally:
            self._syncing = False
        self.validate_all()

    # -- editing -------------------------------------------------------------------------------------------

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Switch.Changed)
    def _edited(self, event) -> None:
        widget = event.control
        if self._syncing or not widget.id or not widget.id.startswith("f-"):
            return
        key = key_of(widget.id)
        info = self._infos[key]
        if isinstance(widget, Switch):
            self.query_one(f"#state-{widget.id}", Static).update(_on_off(bool(event.value)))
        session = app_of(self).session
        file = str(session.config_path or "<form>")
        value = event.value
        try:
            if isinstance(widget, Input):
                value = parse(value, info, file)
            session.config = with_value(session.config, key, value, file)
        except ConfigError as exc:
            self._typing_errors[key] = f"{exc.message}" + (f"; fix: {exc.fix}" if exc.fix else "")
        else:
            self._typing_errors.pop(key, None)
        self.validate_all()

    def validate_all(self) -> list[str]:
        """Show the engine's verdict under each field; returns every message (empty = valid)."""
        session = app_of(self).session
        errors: dict[str, list[str]] = {}
        for key, message in self._typing_errors.items():
            errors.setdefault(key, []).append(message)
        for err in check_config(session.config, str(session.config_path or "<form>")):
            msg = f"{err.key}: {err.message}" + (f"; fix: {err.fix}" if err.fix else "")
            errors.setdefault(field_of_error_key(err.key), []).append(msg)
        for key in self._infos:
            box = self.query_one(f"#err-{widget_id(key)}", Static)
            text = "\n".join(errors.get(key, []))
            box.update(text)
            box.set_class(bool(text), "shown")
        count = sum(len(v) for v in errors.values())
        status = self.query_one("#config-status", Static)
        if count:
            first = next(iter(errors))
            status.update(f"[b red]{count} problem{'s' * (count > 1)}[/], first at [b]{first}[/]")
        elif problems := app_of(self).services.setting_problems(session.config):
            # A valid file that cannot run on this machine (it may on another: saving stays allowed); the Run
            # screen refuses to start it with the same words.
            status.update(f"[b yellow]config valid, but cannot run here:[/] {escape(problems[0])}"
                          + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        else:
            status.update("[green]config valid[/]" + ("" if session.config.data.datasets
                                                      else "  [yellow](no dataset yet: Dataset screen, 1)[/]"))
        self._update_diff()
        return [m for v in errors.values() for m in v]

    def _update_diff(self) -> None:
        session = app_of(self).session
        preset = session.preset_path.name if session.preset_path else "the defaults"
        changes = diff(session.preset_config(), session.config)
        lines = [f"{len(changes)} difference(s) from {preset}:"]
        lines += [f"{c.key}: {show(c.old, self._infos[c.key])} -> {show(c.new, self._infos[c.key])}"
                  if c.key in self._infos else f"{c.key}: {c.old!r} -> {c.new!r}" for c in changes]
        self.query_one("#diff", Static).update("\n".join(lines))

    # -- actions -------------------------------------------------------------------------------------------

    def action_show_diff(self) -> None:
        self.query_one("#topics", TabbedContent).active = "topic-diff"

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        problems = self.validate_all()
        if problems:
            self.notify(problems[0], title="Not saved: fix the config first", severity="error", timeout=8)
            return
        session = app_of(self).session
        path = Path(self.query_one("#save-path", Input).value.strip() or DEFAULT_SAVE_NAME)
        extends = None
        if not path.exists() and session.preset_path is not None:
            # A new file records only what differs from its preset, so it stays short and readable.
            extends = extends_path(session.preset_path, path.parent)
        try:
            save_config(session.config, path, extends=extends)
        except (ConfigError, OSError) as exc:
            self.notify(str(exc), title="Not saved", severity="error", timeout=10)
            return
        session.config_path = path
        self.notify(f"Saved {path}")


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def extends_path(preset: Path, folder: Path) -> str:
    """How a new config file in `folder` names its preset: relative when the preset lies in that folder's tree
    (the two move together), else absolute: a relative path climbing into the install's presets/ broke as soon as
    the file or the install moved."""
    preset, folder = preset.resolve(), folder.resolve()
    return str(preset.relative_to(folder)) if preset.is_relative_to(folder) else str(preset)
