"""The Textual app: screens as modes, hardware readings at 1 Hz, the one worker-failure handler, quitting.

`build_app` is the only way an app is made, by the CLI (`commands/tui.py`) and by the tests alike, so what the
tests drive is what users run. Over SSH: no animation, NO_COLOR is honoured by Textual itself, TERM is never
touched, and a hangup leaves a run started here going (see `hangup`).
"""
from __future__ import annotations

import logging
import traceback

from textual.app import App
from textual.binding import Binding
from textual.worker import Worker, WorkerState

from engine.config import ConfigError, with_value
from engine.events import RunEnded

from s2v_tui.app_handle import READINGS_GROUP, Readings, WorkerContext
from s2v_tui.palette import S2VCommands
from s2v_tui.screens.attach import AttachScreen
from s2v_tui.screens.config_form import ConfigScreen
from s2v_tui.screens.dataset import DatasetScreen
from s2v_tui.screens.dialogs import STOP, ConfirmQuit, ErrorReport
from s2v_tui.screens.entries import EntryListDialog
from s2v_tui.screens.new_run import NewRunDialog
from s2v_tui.screens.presets import PresetsScreen
from s2v_tui.screens.run import RunScreen
from s2v_tui.services import Services
from s2v_tui.session import Session

log = logging.getLogger(__name__)

# Focus that reads without colour too (NO_COLOR, a monochrome terminal): the border's glyphs change on focus, not
# only its tint, and a one-line text box gets a bar at its left (the form's rows draw it, see config_form.py).
FOCUS_CSS = """
Input:focus { border: double $accent; }
Input.-textual-compact:focus { border: none; text-style: bold; }
DataTable { border-left: blank; }
DataTable:focus { border-left: outer $accent; }
"""


class S2VApp(App[int]):
    TITLE = "s2v-tui"
    SUB_TITLE = "Wan 2.2 S2V LoRA"
    CSS = FOCUS_CSS
    COMMANDS = App.COMMANDS | {S2VCommands}
    MODES = {"dataset": DatasetScreen, "presets": PresetsScreen, "config": ConfigScreen, "run": RunScreen,
             "attach": AttachScreen}
    BINDINGS = [
        Binding("1", "switch_mode('dataset')", "Dataset", show=False, id="go.dataset",
                tooltip="Check a dataset folder with the dataset doctor"),
        Binding("2", "switch_mode('presets')", "Presets", show=False, id="go.presets",
                tooltip="GPU memory and the presets that fit"),
        Binding("3", "switch_mode('config')", "Config", show=False, id="go.config",
                tooltip="Edit and save the run config"),
        Binding("4", "switch_mode('run')", "Run", show=False, id="go.run", tooltip="Start and watch training"),
        Binding("5", "switch_mode('attach')", "Runs", show=False, id="go.attach",
                tooltip="Follow a run started elsewhere"),
        Binding("n", "new_run", "New run", show=False, id="app.new_run",
                tooltip="Set up a run: model, dataset folder and name, or a tiny demo"),
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True,
                tooltip="Quit; asks first while a run started here is training"),
    ]

    def __init__(self, services: Services, session: Session, start_mode: str = "dataset",
                 poll_hardware: bool = True) -> None:
        super().__init__()
        self.services = services
        self.session = session
        self.start_mode = start_mode
        self.readings = Readings()
        self.worker_contexts: dict[Worker, WorkerContext] = {}
        self.hung_up = False
        self._poll_hardware = poll_hardware
        self._quit_when_idle = False
        self.animation_level = "none"  # every frame over SSH costs bandwidth and latency

    # -- hardware readings ------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.switch_mode(self.start_mode)
        if self._poll_hardware:
            self.poll_readings()
            self.set_interval(1.0, self.poll_readings, name="nvml-1hz")

    def poll_readings(self) -> None:
        """Start one poll unless the previous one is still out: polls chain, they never pile up."""
        if any(w.group == READINGS_GROUP and w.is_running for w in self.workers):
            return
        self.run_worker(self._read_hardware, thread=True, group=READINGS_GROUP, exit_on_error=False,
                        name="hardware readings")

    def _read_hardware(self) -> None:
        probe = self.services.probe
        gpus = tuple(probe.snapshots())
        host = self.services.host_memory()
        reason = "" if probe.available else probe.reason
        # One attribute assignment: the UI thread sees the old readings or the new, never a mix.
        self.readings = Readings(gpus, host, reason, self.readings.version + 1)

    # -- workers: the one handler for every outcome ------------------------------------------------------

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.handle_worker_state(event)

    def handle_worker_state(self, event: Worker.StateChanged) -> None:
        """The one handler for every worker of the app and its screens (they forward here, see base.py)."""
        worker = event.worker
        if event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        context = self.worker_contexts.pop(worker, None)
        done = getattr(worker.node, "worker_done", None)
        if done is not None:
            done(worker)
        if event.state == WorkerState.ERROR and worker.group != READINGS_GROUP:
            self._report_failure(worker, context)
        elif event.state == WorkerState.SUCCESS and isinstance(worker.result, RunEnded) \
                and worker.result.status in ("failed", "refused"):
            # The engine catches its own failures, writes the traceback to train.log and returns the reason; a
            # refusal (a changed config on a trained run, a folder in use) touched nothing and says the ways on.
            run_dir = context.run_dir if context else None
            log_path = run_dir / "train.log" if run_dir is not None else None
            title = "training failed" if worker.result.status == "failed" else "the run was not started"
            self.push_screen(ErrorReport(title, worker.result.reason or "the run failed",
                                         str(run_dir) if run_dir else None,
                                         str(log_path) if log_path and log_path.exists() else None))
        if self._quit_when_idle and not self.training_active():
            self.exit(0)

    def _report_failure(self, worker: Worker, context: WorkerContext | None) -> None:
        error = worker.error
        what = context.what if context else (worker.name or "a background task")
        run_dir = context.run_dir if context else None
        log_path = None
        if run_dir is not None and error is not None:
            log_path = run_dir / "train.log"
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(f"\n{what} failed:\n")
                    f.write("".join(traceback.format_exception(error)))
            except OSError:
                log.exception("could not write %s", log_path)
                log_path = None
        message = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
        self.push_screen(ErrorReport(f"{what} failed", message, str(run_dir) if run_dir else None,
                                     str(log_path) if log_path else None))

    # -- quitting ----------------------------------------------------------------------------------------

    def training_worker(self) -> Worker | None:
        for worker in self.workers:
            if worker.group == RunScreen.WORKER_GROUP and not worker.is_finished:
                return worker
        return None

    def training_active(self) -> bool:
        return self.training_worker() is not None

    async def action_quit(self) -> None:
        worker = self.training_worker()
        if worker is None:
            self.exit(0)
            return
        run_screen = worker.node

        def answered(answer: str | None) -> None:
            if answer == STOP and isinstance(run_screen, RunScreen):
                self._quit_when_idle = True
                run_screen.request_stop()
                self.notify("Writing a checkpoint; the app closes when the run has stopped.")

        run_dir = run_screen.run_dir if isinstance(run_screen, RunScreen) else ""
        self.push_screen(ConfirmQuit(str(run_dir)), answered)

    def hangup(self) -> None:
        """The terminal went away (SIGHUP). Leave the UI without stopping a run started here.

        The training thread keeps going, writing events.jsonl, and `s2v-tui attach RUN_DIR` follows it from a
        new session; Textual waits for that thread before the process ends. The stop event is ours, not the
        worker's cancelled_event, precisely so that this exit (which cancels every worker) does not stop it.
        """
        self.hung_up = True
        log.warning("terminal hung up; the UI exits, a run started here continues headless")
        self.exit(0)

    # -- editing the config from any screen ----------------------------------------------------------------

    def config_file(self) -> str:
        return str(self.session.config_path or "<app>")

    def apply_settings(self, settings: dict) -> str:
        """Set each {dotted key: value} on the session's config, checked as a file would be; the error, or ""."""
        config = self.session.config
        try:
            for key, value in settings.items():
                config = with_value(config, key, value, self.config_file())
        except ConfigError as exc:
            return str(exc)
        self.session.config = config
        changed = getattr(self.screen, "config_changed", None)
        if changed is not None:
            changed()
        return ""

    def action_new_run(self) -> None:
        def answered(settings: dict | None) -> None:
            if settings is None:
                return
            error = self.apply_settings(settings)
            if error:
                self.notify(error, title="Not applied", severity="error", timeout=10)
            else:
                self.notify(f"Run {settings['output.name']} set up: check the clips on the Dataset screen (1), "
                            "then start it on the Run screen (4).", timeout=8)

        self.push_screen(NewRunDialog(self.session.config), answered)

    def action_edit_list(self, key: str) -> None:
        """Add, remove and edit the entries of [[data.datasets]] or [[validation.cases]]."""
        def answered(entries: list | None) -> None:
            if entries is not None:
                error = self.apply_settings({key: entries})
                if error:
                    self.notify(error, title="Not applied", severity="error", timeout=10)

        add = self._typed_folder() if key == "data.datasets" else ""
        self.push_screen(EntryListDialog(self.session.config, key, self.config_file(), add_path=add), answered)

    def _typed_folder(self) -> str:
        """The Dataset screen's folder box, offered as the path of a new dataset entry."""
        folder = getattr(self.screen, "typed_folder", None)
        return folder() if folder is not None else ""


def build_app(services: Services, session: Session, start_mode: str = "dataset",
              poll_hardware: bool = True) -> S2VApp:
    """The one factory: the CLI and every test get the same app."""
    return S2VApp(services, session, start_mode=start_mode, poll_hardware=poll_hardware)
