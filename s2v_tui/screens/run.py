"""Run: start the engine in the one training worker and watch it; Stop asks first.

The worker calls `services.runner(config, [bridge], stop, run_dir)` on a thread. `stop` is a
threading.Event owned by this screen and set only by Stop or a confirmed quit: Textual cancels every worker
when the app exits, and after an SSH hangup the run must outlive the UI (see S2VApp.hangup).

Before the runner, the same worker asks the engine what would happen in the run folder
(s2v_tui.app_logic.run_decision): when the folder holds a trained run that the config differs from, the worker
returns that instead of training, and the screen asks the user (continue, a new run under another name, or cancel)
before anything starts.
"""
from __future__ import annotations

import threading
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Footer, Static
from textual.worker import Worker, get_current_worker

from engine.config import check_config, with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME, RunEnded, RunStarted, StepEnd

from s2v_tui.app_handle import WorkerContext, app_of
from s2v_tui.bridge import EventBridge, EventsPending
from s2v_tui.app_logic.run_model import RunModel
from s2v_tui.app_logic.run_decision import Decision
from s2v_tui.screens.decision import CONTINUE, NEW, RunDecisionDialog
from s2v_tui.screens.dialogs import STOP, ConfirmStop
from s2v_tui.screens.base import AppScreen
from s2v_tui.services import engine_runner, leave_a_core_for_the_ui
from s2v_tui.widgets.checkpoints import CheckpointList
from s2v_tui.widgets.nav import NavBar
from s2v_tui.widgets.run_panels import RunPanels

PAINT_HZ = 2  # the slow end of 2-4 Hz: each paint holds the GIL the training thread needs (bench/tui_overhead.py)


class LossHistory(Message):
    """From the training worker: the steps earlier processes logged in the run folder, before it resumes there."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events


def past_steps(run_dir: Path) -> list:
    """The RunStarted and StepEnd events already in `run_dir`'s event log (none for a new folder)."""
    path = run_dir / EVENTS_FILENAME
    if not path.is_file():
        return []
    return [e for e in read_events(path) if isinstance(e, (RunStarted, StepEnd))]


class RunScreen(AppScreen):
    WORKER_GROUP = "training"
    BINDINGS = [
        Binding("s", "start", "Start", id="run.start", tooltip="Start training with the current config"),
        Binding("x", "stop", "Stop", id="run.stop", tooltip="Stop at the next step, after a checkpoint"),
        Binding("ctrl+q", "app.quit", "Quit", id="run.quit", tooltip="Quit (asks while training)"),
    ]
    DEFAULT_CSS = """
    RunScreen #run-hint { height: 1; padding: 0 1; color: $text-muted; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.model = RunModel()
        self.stop_event = threading.Event()
        self.run_dir: Path | None = None
        self.bridge = EventBridge(self)

    def compose(self) -> ComposeResult:
        yield NavBar("run")
        yield Static("press s to start training with the current config", id="run-hint")
        yield RunPanels(id="panels")
        yield CheckpointList(lambda: self.model.snapshot(), id="checkpoints")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1 / PAINT_HZ, self.repaint, name="run-paint")
        self.repaint()

    def repaint(self) -> None:
        readings = app_of(self).readings
        self.query_one(RunPanels).paint(self.model.snapshot(), readings.gpus, readings.host)

    @on(EventsPending)
    def _take_events(self, message: EventsPending) -> None:
        for event in message.bridge.drain():
            self.model.apply(event)

    @on(LossHistory)
    def _take_history(self, message: LossHistory) -> None:
        self.model.load_history(message.events)

    # -- start ---------------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        running = app_of(self).training_active()
        if action == "start":
            return None if running else True  # None: shown, greyed out
        if action == "stop":
            return True if running and not self.stop_event.is_set() else None
        return super().check_action(action, parameters)

    def start_refusal(self) -> str | None:
        """Why training cannot start now, in words for the user; None when it can."""
        app = app_of(self)
        session = app.session
        if app.training_active():
            return "a run is already training in this app"
        if app.services.runner is None:
            return "the training engine (engine.runner) is not installed in this build"
        if session.dataset_blocking:
            return (f"the dataset check of {session.report_folder} found blocking problems: fix those clips (or "
                    "move them out) and check again on the Dataset screen (1)")
        errors = check_config(session.config, str(session.config_path or "<config>"), require_data=True)
        if errors:
            return f"the config is not valid: {errors[0]}"
        problems = app.services.setting_problems(session.config)  # what the runner's check phase would refuse
        if problems:
            return "these settings cannot run here: " + "; ".join(problems)
        return None

    def action_start(self, decided: bool = False) -> None:
        """Start the run of the session's config; `decided`: the user has answered the run folder's question."""
        refusal = self.start_refusal()
        if refusal:
            self.notify(refusal, title="Cannot start", severity="error", timeout=8)
            return
        config = app_of(self).session.config
        self.run_dir = config.run_path()
        self.stop_event = threading.Event()
        self.model.reset()
        self.query_one(RunPanels).reset()
        self.query_one("#run-hint", Static).update(f"training in {self.run_dir}   x: stop (checkpoint first)")
        worker = self.train(config, self.run_dir, self.stop_event, decided)
        app_of(self).worker_contexts[worker] = WorkerContext("training", self.run_dir)
        self.refresh_bindings()

    @work(thread=True, exclusive=True, exit_on_error=False, group=WORKER_GROUP, name="training")
    def train(self, config, run_dir: Path, stop: threading.Event, decided: bool = False) -> RunEnded | Decision:
        get_current_worker()  # a thread worker by contract; the engine's stop is `stop` (see module doc)
        if not decided:
            from s2v_tui.app_logic.run_decision import decide

            decision = decide(config, run_dir)
            if decision is not None:
                return decision  # nothing ran: worker_done asks the user
        history = past_steps(run_dir)
        if history:
            self.post_message(LossHistory(history))  # posted before the first event of the run: applied first
        services = app_of(self).services
        if services.runner is engine_runner():
            leave_a_core_for_the_ui()  # the real engine only: a fake one has no torch threads to spare
        return services.runner(config, [self.bridge], stop, run_dir=run_dir)

    def ask(self, decision: Decision) -> None:
        """The run folder holds a trained run the config differs from: the user decides, nothing has started."""
        self.query_one("#run-hint", Static).update(f"not started: {decision.run_dir} already holds a run")

        def answered(answer: tuple[str, str] | None) -> None:
            if answer is None:
                self.query_one("#run-hint", Static).update("not started; press s to start")
                return
            kind, name = answer
            if kind == CONTINUE:
                self.action_start(decided=True)
            elif kind == NEW:
                session = app_of(self).session
                session.config = with_value(session.config, "output.name", name, "<new run name>")
                self.notify(f"output.name is now {name} (save the config on the Config screen to keep it)")
                self.action_start()  # asked again should that folder hold a run too

        self.app.push_screen(RunDecisionDialog(decision, app_of(self).session.config), answered)

    # -- stop ----------------------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if not app_of(self).training_active():
            return
        snap = self.model.snapshot()

        def answered(answer: str | None) -> None:
            if answer == STOP:
                self.request_stop()

        self.app.push_screen(ConfirmStop(snap.step, snap.total_steps), answered)

    def request_stop(self) -> None:
        self.stop_event.set()
        self.query_one("#run-hint", Static).update("stopping: a checkpoint is written at the next step boundary")
        self.refresh_bindings()

    def worker_done(self, worker: Worker) -> None:
        """Called by the app's one worker handler when the training worker has finished, however it ended."""
        if worker.group != self.WORKER_GROUP:
            return
        if isinstance(worker.result, Decision):
            self.refresh_bindings()
            self.ask(worker.result)
            return
        for event in self.bridge.drain():  # events that raced the end of the worker
            self.model.apply(event)
        if worker.error is not None:
            self.model.fail(f"{type(worker.error).__name__}: {worker.error}")
        status = self.model.snapshot().status
        self.query_one("#run-hint", Static).update(f"run {status}; press s to start another")
        self.refresh_bindings()
