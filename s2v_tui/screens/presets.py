"""Presets: live GPU readings (1 Hz, from the app's poll), host RAM, and the presets with the memory each
needs against what is free. Without an NVIDIA driver the screen says so and takes a typed VRAM size. The host
RAM field follows the live reading until the user types a size (to plan for another host); emptying it goes
back to the live reading."""
from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.validation import Number
from textual.widgets import DataTable, Footer, Input, Label, Static

from engine.config import with_value

from s2v_tui.app_handle import app_of
from s2v_tui.app_logic.fmt import gib
from s2v_tui.app_logic.presets_logic import (PresetRow, available_host, available_vram, evaluate, load_presets,
                                             recommend)
from s2v_tui.screens.base import AppScreen
from s2v_tui.widgets.nav import NavBar

GPU_COLUMNS = ("GPU", "name", "total", "used", "free", "util", "temp")
PRESET_COLUMNS = ("", "preset", "VRAM need", "host need", "fits")
GIB = 2**30
# A host RAM size the field accepts, in GiB: a typo of a few zeros is refused rather than planned for.
HOST_GIB_RANGE = (1.0, 65536.0)
# Likewise the free GPU memory typed when NVML cannot tell (no card has less than 1 GiB or more than 1 TiB).
VRAM_GIB_RANGE = (1.0, 1024.0)


def _fits(row: PresetRow) -> str:
    if row.error:
        return "[red]does not load[/]"
    if row.need is None:
        return "[dim]not measured yet[/]"
    if row.fits_gpu is None:
        return "[dim]free VRAM unknown[/]"
    if not row.fits_gpu:
        return "[red]too big for the GPU[/]"
    if row.fits_host is False:
        return "[red]host RAM too small[/]"
    return "[green]fits[/]"


class PresetsScreen(AppScreen):
    BINDINGS = [
        Binding("u", "use_preset", "Use preset", id="presets.use",
                tooltip="Load the highlighted preset as the run config (keeps your datasets)"),
        Binding("ctrl+r", "reload", "Reload", id="presets.reload", tooltip="Read the preset files again"),
    ]
    DEFAULT_CSS = """
    PresetsScreen #gpus { height: auto; max-height: 10; }
    PresetsScreen #no-driver { height: auto; padding: 0 1; color: $warning; }
    PresetsScreen #vram-row { height: 3; display: none; }
    PresetsScreen #vram-row.shown { display: block; }
    PresetsScreen #vram-row Label { padding: 1 1; }
    PresetsScreen #vram { width: 16; }
    PresetsScreen #host-row { height: 3; }
    PresetsScreen #host { width: auto; padding: 1 1; }
    PresetsScreen #host-gb { width: 12; }
    PresetsScreen #host-unit { padding: 1 0; }
    PresetsScreen #presets { height: 1fr; }
    PresetsScreen #preset-note { height: auto; padding: 0 1; color: $text-muted; }
    """

    # The table, not the host RAM box: a focused box would take the screen keys ("3") as text.
    AUTO_FOCUS = "#presets"

    def __init__(self) -> None:
        super().__init__()
        self._presets: list = []
        self._painted_version = -1
        self._rows: list[PresetRow] = []
        self._host_live_text = ""  # what the host field was last filled with from the live reading
        self._host_problem = ""
        self._vram_problem = ""

    def compose(self) -> ComposeResult:
        yield NavBar("presets")
        gpus = DataTable(id="gpus", cursor_type="none", show_cursor=False)
        gpus.add_columns(*GPU_COLUMNS)
        yield gpus
        yield Static("", id="no-driver", markup=False)
        with Horizontal(id="vram-row"):
            yield Label("VRAM of the GPU you will train on (GB):")
            yield Input(placeholder="e.g. 80", id="vram", type="number",
                        validators=[Number(minimum=VRAM_GIB_RANGE[0], maximum=VRAM_GIB_RANGE[1])],
                        tooltip="Used instead of NVML readings to pick a preset")
        with Horizontal(id="host-row"):
            yield Static("", id="host")
            yield Input(id="host-gb", type="number", placeholder="GiB",
                        validators=[Number(minimum=HOST_GIB_RANGE[0], maximum=HOST_GIB_RANGE[1])],
                        tooltip="Host RAM to plan for, in GiB (the live reading until you type; empty = live)")
            yield Label("GiB", id="host-unit")
        presets = DataTable(id="presets", cursor_type="row")
        presets.add_columns(*PRESET_COLUMNS)
        yield presets
        yield Static("", id="preset-note")
        yield Footer()

    def on_mount(self) -> None:
        self.action_reload()
        self.set_interval(1.0, self.repaint, name="presets-1hz")
        self.repaint()

    def action_reload(self) -> None:
        self._presets = load_presets(app_of(self).services.presets_dir)
        self._painted_version = -1
        self.repaint()

    def repaint(self) -> None:
        readings = app_of(self).readings
        if readings.version == self._painted_version:
            return
        self._painted_version = readings.version
        self._paint_gpus(readings)
        self._paint_host(readings)
        self._paint_presets(readings)

    def _paint_host(self, readings) -> None:
        host = readings.host
        planned = app_of(self).session.host_override_gb
        self.query_one("#host", Static).update(
            (f"host RAM {gib(host.available_bytes)} GiB available of {gib(host.total_bytes)} GiB"
             if host else "host RAM: not read yet") + (" · planning for" if planned is not None else " · plan for"))
        field = self.query_one("#host-gb", Input)
        # Follow the live reading until the user types a size; never under the user's cursor.
        if host is not None and planned is None and not field.has_focus:
            text = f"{host.available_bytes / GIB:.1f}"
            if field.value != text:
                self._host_live_text = text
                self._host_problem = ""  # a refused entry is gone once the live reading replaces it
                field.value = text

    def _paint_gpus(self, readings) -> None:
        table = self.query_one("#gpus", DataTable)
        table.clear()
        for g in readings.gpus:
            table.add_row(str(g.index), g.name, gib(g.total_bytes), gib(g.used_bytes), gib(g.free_bytes),
                          f"{g.util_percent}%" if g.util_percent is not None else "-",
                          f"{g.temperature_c}C" if g.temperature_c is not None else "-")
        no_driver = readings.version > 0 and not readings.gpus
        table.display = not no_driver
        self.query_one("#no-driver", Static).update(
            f"No GPU readings: {readings.nvml_reason or 'no GPU found'}. "
            "Type the VRAM size to choose a preset." if no_driver else "")
        self.query_one("#vram-row").set_class(no_driver, "shown")

    def _paint_presets(self, readings) -> None:
        session = app_of(self).session
        vram_free = available_vram(readings.gpus, session.vram_override_gb)
        host_available = available_host(readings.host, session.host_override_gb)
        predict = app_of(self).services.predict_memory
        self._rows, choice = evaluate(self._presets, predict, vram_free, host_available)
        best = recommend(self._rows, choice)
        table = self.query_one("#presets", DataTable)
        cursor = table.cursor_row
        table.clear()
        for row in self._rows:
            mark = "[b green]*[/]" if row is best else ("[b]>[/]" if row.path == session.preset_path else "")
            name = f"[b green]{row.name} (recommended)[/]" if row is best else row.name
            vram = gib(row.need.vram_bytes) + " GiB" if row.need else "not measured yet"
            host = gib(row.need.host_bytes) + " GiB" if row.need else "-"
            table.add_row(mark, name, vram, host, _fits(row), key=str(row.path))
        if self._rows:
            table.move_cursor(row=min(cursor, len(self._rows) - 1))
        measured = any(r.need for r in self._rows)
        if not self._rows:
            note = f"No preset files in {app_of(self).services.presets_dir}. "
        elif not measured:
            note = "The memory model has no measurements yet: needs are unknown, so nothing is recommended. "
        else:
            note = f"{choice.why_none[0].upper()}{choice.why_none[1:]}. " if choice.why_none else ""
        self.query_one("#preset-note", Static).update(
            self._vram_problem + self._host_problem + note + "Enter or u: use the highlighted preset.")

    @on(Input.Changed, "#vram")
    def _vram_typed(self, event: Input.Changed) -> None:
        text = event.value.strip()
        valid = bool(text) and (event.validation_result is None or event.validation_result.is_valid)
        self._vram_problem = "" if valid or not text else (
            f"VRAM {text!r} is not a size from {VRAM_GIB_RANGE[0]:g} to {VRAM_GIB_RANGE[1]:g} GiB. ")
        app_of(self).session.vram_override_gb = float(text) if valid else None
        self._painted_version = -1
        self.repaint()

    @on(Input.Changed, "#host-gb")
    def _host_typed(self, event: Input.Changed) -> None:
        session = app_of(self).session
        text = event.value.strip()
        if session.host_override_gb is None and text == self._host_live_text:
            return  # the screen's own fill from the live reading
        self._host_problem = ""
        if not text:
            session.host_override_gb = None  # empty: back to the live reading
        elif event.validation_result is not None and not event.validation_result.is_valid:
            session.host_override_gb = None
            self._host_problem = (f"Host RAM {text!r} is not a size from {HOST_GIB_RANGE[0]:g} to "
                                  f"{HOST_GIB_RANGE[1]:g} GiB: using the live reading. ")
        else:
            session.host_override_gb = float(text)
        self._painted_version = -1
        self.repaint()

    @on(DataTable.RowSelected, "#presets")
    def action_use_preset(self) -> None:
        table = self.query_one("#presets", DataTable)
        if not self._rows or table.cursor_row >= len(self._rows):
            return
        row = self._rows[table.cursor_row]
        if row.config is None:
            self.notify(row.error, title=f"{row.name} does not load", severity="error", timeout=10)
            return
        session = app_of(self).session
        datasets = [vars(d).copy() for d in session.config.data.datasets]
        session.config = with_value(row.config, "data.datasets", datasets) if datasets else row.config
        session.preset_path = row.path
        self._painted_version = -1
        self.repaint()
        self.notify(f"Config now from preset {row.name}; edit it on the Config screen (3).")
