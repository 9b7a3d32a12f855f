"""Runs: pick a run under the runs folder (or come here from `s2v-tui attach RUN_DIR`) and follow it by
tailing its events.jsonl, with the same panels as the Run screen. Detaching only stops reading: the run
belongs to another process and never hears of it."""
from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import ContentSwitcher, DataTable, Footer, Static
from textual.worker import Worker, get_current_worker

from engine.event_log import follow_events
from engine.events import EVENTS_FILENAME

from s2v_tui.app_handle import WorkerContext, app_of
from s2v_tui.bridge import EventBridge, EventsPending
from s2v_tui.app_logic.run_model import RunModel
from s2v_tui.app_logic.runs_index import list_runs
from s2v_tui.screens.base import AppScreen
from s2v_tui.widgets.checkpoints import CheckpointList
from s2v_tui.widgets.nav import NavBar
from s2v_tui.widgets.run_panels import RunPanels

PAINT_HZ = 4
FOLLOW_GROUP = "follow"


class AttachScreen(AppScreen):
    BINDINGS = [
        Binding("ctrl+r", "refresh_runs", "Refresh", id="attach.refresh", tooltip="List the runs again"),
        Binding("ctrl+d", "detach", "Detach", id="attach.detach",
                tooltip="Stop following; the run itself goes on"),
    ]
    DEFAULT_CSS = """
    AttachScreen #runs-hint { height: auto; padding: 0 1; color: $text-muted; }
    AttachScreen #runs { height: 1fr; }
    AttachScreen #switcher { height: 1fr; }
    AttachScreen #picker { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.model = RunModel()
        self.bridge = EventBridge(self)
        self.following: Path | None = None
        self._runs: list = []

    def compose(self) -> ComposeResult:
        yield NavBar("attach")
        with ContentSwitcher(initial="picker", id="switcher"):
            with Vertical(id="picker"):
                yield Static("", id="runs-hint")
                table = DataTable(id="runs", cursor_type="row")
                table.add_columns("run", "status", "step", "host", "folder")
                yield table
            yield RunPanels(id="follow-panels")
        yield CheckpointList(lambda: self.model.snapshot() if self.following else None, id="checkpoints")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1 / PAINT_HZ, self.repaint, name="attach-paint")
        self.action_refresh_runs()
        target = app_of(self).session.attach_dir
        if target is not None:
            self.attach(Path(target))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "detach":
            return self.following is not None
        if action == "refresh_runs":
            return self.following is None
        return super().check_action(action, parameters)

    def action_refresh_runs(self) -> None:
        runs_dir = app_of(self).services.runs_dir
        self._runs = list_runs(Path(runs_dir))
        table = self.query_one("#runs", DataTable)
        table.clear()
        for run in self._runs:
            step = f"{run.step}/{run.total_steps}" if run.total_steps else str(run.step)
            table.add_row(run.name, run.status, step, run.host, str(run.run_dir))
        self.query_one("#runs-hint", Static).update(
            f"{len(self._runs)} run(s) under {runs_dir}. Enter: follow the highlighted run "
            "(read-only; the run is never stopped from here)." if self._runs
            else f"No runs under {runs_dir} yet (a run folder holds {EVENTS_FILENAME}).")

    @on(DataTable.RowSelected, "#runs")
    def _picked(self, event: DataTable.RowSelected) -> None:
        if 0 <= event.cursor_row < len(self._runs):
            self.attach(self._runs[event.cursor_row].run_dir)

    def attach(self, run_dir: Path) -> None:
        self.workers.cancel_group(self, FOLLOW_GROUP)
        self.model = RunModel()
        self.bridge = EventBridge(self)  # a fresh queue: nothing of the previous run leaks into this one
        panels = self.query_one("#follow-panels", RunPanels)
        panels.reset()
        self.following = run_dir
        self.query_one("#switcher", ContentSwitcher).current = "follow-panels"
        worker = self.follow(run_dir, self.bridge)
        app_of(self).worker_contexts[worker] = WorkerContext(f"following {run_dir}", None)
        self.refresh_bindings()

    @work(thread=True, exclusive=True, exit_on_error=False, group=FOLLOW_GROUP, name="follow events")
    def follow(self, run_dir: Path, bridge: EventBridge) -> None:
        # Cancelling this worker (detach, another run, app exit) sets cancelled_event, which ends the tail.
        stop = get_current_worker().cancelled_event
        for event in follow_events(run_dir / EVENTS_FILENAME, stop):
            bridge(event)

    def action_detach(self) -> None:
        self.workers.cancel_group(self, FOLLOW_GROUP)
        self.following = None
        self.query_one("#switcher", ContentSwitcher).current = "picker"
        self.action_refresh_runs()
        self.refresh_bindings()

    @on(EventsPending)
    def _take_events(self, message: EventsPending) -> None:
        if message.bridge is not self.bridge:
            message.bridge.drain()  # from a run we no longer follow
            return
        for event in message.bridge.drain():
            self.model.apply(event)

    def repaint(self) -> None:
        if self.following is None:
            return
        readings = app_of(self).readings
        self.query_one("#follow-panels", RunPanels).paint(self.model.snapshot(), readings.gpus, readings.host)

    def worker_done(self, worker: Worker) -> None:
        if worker.group == FOLLOW_GROUP and worker.error is not None:
            self.model.fail(f"following stopped: {worker.error}")
