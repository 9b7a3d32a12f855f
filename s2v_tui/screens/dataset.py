"""Dataset: pick a folder (or take it from the config), run the doctor in a thread worker, show every clip
and the problems grouped by code with their fix. A blocking problem disables Train (which says why).

The check uses the engine's doctor settings for the run config (engine.data.cache_plan.doctor_settings: windows,
buckets, smallest side, seed), the same as `s2v-tui check CONFIG.toml` and the run's cache phase, so the three
never disagree about a clip. The folder can go into the config's [[data.datasets]] with or without a check
(a warning says what is known), and the whole list is edited in a dialog (e).
"""
from __future__ import annotations

from pathlib import Path

from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Button, DataTable, Footer, Input, ProgressBar, Static
from textual.worker import Worker, get_current_worker

from engine.data.discover import DatasetSpec
from engine.data.doctor import DoctorReport, problems_by_code

from s2v_tui.app_handle import WorkerContext, app_of
from s2v_tui.screens.base import AppScreen
from s2v_tui.screens.run import RunScreen
from s2v_tui.widgets.nav import NavBar

CLIP_COLUMNS = ("clip", "status", "duration", "fps", "audio", "bucket", "windows")


class DoctorProgress(Message):
    """From the doctor's thread: clips done so far. Replaceable: only the newest count matters."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__()
        self.done = done
        self.total = total

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DoctorProgress)


def dataset_spec(config, folder: str) -> DatasetSpec:
    """The folder as the run would read it: with every key of its [[data.datasets]] entry (audio folder, caption
    prefix and separator, default caption, repeats, weight), or the defaults when the config has no such entry."""
    entry = next((d for d in config.data.datasets if d.path == folder), None)
    return DatasetSpec.of_entry(entry) if entry is not None else DatasetSpec(Path(folder).expanduser())


def datasets_line(config, folder: str) -> str:
    """The config's datasets in one line, the folder in the box marked when it is one of them."""
    from s2v_tui.screens.entries import entry_summary

    entries = [vars(d) for d in config.data.datasets]
    if not entries:
        return "[yellow]the run config has no dataset yet[/]: a adds this folder, e edits the list"
    names = [("[b]" + entry_summary("data.datasets", e) + "[/]") if e["path"] == folder
             else entry_summary("data.datasets", e) for e in entries]
    return f"in the run config: {', '.join(names)}  [dim](a: add this folder, e: edit the list)[/]"


def _audio_label(source: str) -> str:
    if source.startswith("embedded"):
        return "track"
    return source.split(":", 1)[0]


def clip_row(report, root: Path | None) -> tuple[str, ...]:
    """One table row: status first so a scan down the column finds the bad clips."""
    video = report.clip.video
    try:
        name = str(video.relative_to(root)) if root else video.name
    except ValueError:
        name = video.name
    if any(p.blocking for p in report.problems) or not report.usable:
        status = "[b red]BLOCK[/]"
    elif report.problems:
        status = "[yellow]warn[/]"
    else:
        status = "[green]ok[/]"
    plan = report.plan
    if plan is None:
        return (name, status, "-", "-", "-", "-", "0")
    fps = f"{plan.source_fps:.2f}" if plan.source_fps else "?"
    if plan.variable_rate:
        fps += " vfr"
    # Seconds as the check's lengths write them ("0.04 s"): one decimal showed a one-frame clip as 0.0 s.
    return (name, status, f"{plan.duration_s:.2f} s", fps, _audio_label(plan.audio_source), plan.bucket,
            str(len(plan.windows)))


def problems_text(report: DoctorReport, root: Path | None) -> str:
    """Problems grouped by code, blocking first, each with its fix and the clips it concerns."""
    groups = problems_by_code(report)
    if not groups:
        return "[green]no problems found[/]"
    lines = []
    order = sorted(groups.items(), key=lambda kv: (not kv[1][0].blocking, kv[0]))
    for code, problems in order:
        first = problems[0]
        colour = "red" if first.blocking else "yellow"
        lines.append(f"[b {colour}]{first.severity}[/] [b]{code}[/] x{len(problems)}: {first.message}")
        lines.append(f"  fix: {first.fix}")
        names = []
        for p in problems[:6]:
            try:
                names.append(str(p.path.relative_to(root)) if root else p.path.name)
            except ValueError:
                names.append(p.path.name)
        more = f" and {len(problems) - 6} more" if len(problems) > 6 else ""
        lines.append("  " + ", ".join(names) + more)
    return "\n".join(lines)


class DatasetScreen(AppScreen):
    BINDINGS = [
        Binding("ctrl+r", "check", "Check", id="dataset.check", tooltip="Run the dataset doctor on the folder"),
        Binding("a", "add_folder", "Add", id="dataset.add",
                tooltip="Put the folder into the run config's datasets (a check is not required)"),
        Binding("e", "app.edit_list('data.datasets')", "Datasets", id="dataset.edit",
                tooltip="Add, remove and edit the run config's [[data.datasets]] entries"),
        Binding("ctrl+t", "train", "Train", id="dataset.train",
                tooltip="Train on the run config with this folder in it (needs a check without blocking problems)"),
        Binding("ctrl+c", "cancel_check", "Cancel check", show=False, id="dataset.cancel",
                tooltip="Stop a running check"),
    ]
    DEFAULT_CSS = """
    DatasetScreen #folder-row { height: 3; }
    DatasetScreen #folder { width: 1fr; }
    DatasetScreen #folder-row Button { min-width: 7; }
    DatasetScreen #check-progress { height: 1; padding: 0 1; }
    DatasetScreen #summary { height: 1; padding: 0 1; }
    DatasetScreen #clips { height: 1fr; min-height: 4; }
    DatasetScreen #problems-box { height: 1fr; min-height: 4; border: round $primary-darken-1; padding: 0 1; }
    DatasetScreen #in-config { height: 1; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """
    PATH_STARTS = "/~."  # typed outside a text box, these begin a path: they go into the folder box

    def compose(self) -> ComposeResult:
        yield NavBar("dataset")
        with Horizontal(id="folder-row"):
            # No select-on-focus: a path typed from outside the box (on_key) would replace its own first character.
            yield Input(placeholder="dataset folder (type / or ~ to start one)", id="folder", select_on_focus=False,
                        tooltip="Folder of video clips, each with <stem>.txt or a metadata.jsonl row")
            yield Button("Check", id="check", variant="primary", tooltip="Run the dataset doctor (ctrl+r)")
            yield Button("Add", id="add", tooltip="Put the folder into the run config (a)")
            yield Button("Train", id="train", variant="success", disabled=True,
                         tooltip="Start training with this folder in the run config (ctrl+t)")
        yield ProgressBar(id="check-progress", show_eta=False)
        yield Static("no check yet: type a folder, or press n for a new run (a tiny demo included)", id="summary")
        table = DataTable(id="clips", cursor_type="row", zebra_stripes=True)
        table.add_columns(*CLIP_COLUMNS)
        yield table
        with VerticalScroll(id="problems-box") as box:
            box.border_title = "problems"
            yield Static("", id="problems")
        yield Static("", id="in-config")
        yield Footer()

    # Not the folder box: the screen keys must work when it opens (a focused box takes "2" as text).
    AUTO_FOCUS = "#clips"

    def on_mount(self) -> None:
        datasets = app_of(self).session.config.data.datasets
        if datasets and datasets[0].path:
            self.query_one("#folder", Input).value = datasets[0].path
        report = app_of(self).session.report
        if report is not None:
            self.show_report(report, app_of(self).session.report_folder)
        self.config_changed()

    def typed_folder(self) -> str:
        return self.query_one("#folder", Input).value.strip()

    def config_changed(self) -> None:
        datasets = app_of(self).session.config.data.datasets
        box = self.query_one("#folder", Input)
        if not box.value.strip() and datasets and datasets[0].path:
            box.value = datasets[0].path  # a new run's folder (the New run dialog) is what one checks next
        self.query_one("#in-config", Static).update(
            datasets_line(app_of(self).session.config, self.typed_folder()))
        self._sync_train_button()

    def on_screen_resume(self) -> None:
        self.config_changed()

    def on_key(self, event: events.Key) -> None:
        """A path typed while the folder box is not focused goes into it, instead of firing the keys it holds
        ("2" and "5" of /data/clips256 switched screens)."""
        if event.character and event.character in self.PATH_STARTS and not isinstance(self.focused, Input):
            event.stop()
            event.prevent_default()
            box = self.query_one("#folder", Input)
            box.value = event.character
            box.cursor_position = len(box.value)
            box.focus()

    # -- actions -------------------------------------------------------------------------------------------

    def _train_refusal(self) -> str:
        """Why Train cannot start from here, in words ("" when it can)."""
        session = app_of(self).session
        folder = self.typed_folder()
        report = session.report
        if not folder:
            return "Type the dataset folder first."
        if report is None or session.report_folder != folder:
            return f"Check {folder} first (ctrl+r); or add it without a check (a) and start on the Run screen (4)."
        if report.cancelled:
            return "The check was cancelled: run it again (ctrl+r)."
        if report.blocking:
            return (f"The check found {len(report.blocking)} blocking problem(s) in {folder}: fix those clips (or "
                    "move them out) and check again. Each problem above says its fix.")
        return ""

    def _can_train(self) -> bool:
        return not self._train_refusal()

    @on(Button.Pressed, "#check")
    @on(Input.Submitted, "#folder")
    def action_check(self) -> None:
        folder = self.query_one("#folder", Input).value.strip()
        if not folder:
            self.notify("Type the dataset folder first.", severity="warning")
            return
        self.query_one("#summary", Static).update(f"checking {folder} ...")
        self.query_one("#check-progress", ProgressBar).update(total=None, progress=0)
        worker = self.run_doctor(folder)
        app_of(self).worker_contexts[worker] = WorkerContext(f"dataset check of {folder}")

    @work(thread=True, exclusive=True, exit_on_error=False, group="doctor", name="dataset doctor")
    def run_doctor(self, folder: str) -> tuple[str, DoctorReport]:
        # Imported here, in the worker: the cache planning module brings torch, which the app's start avoids.
        from engine.data.cache_plan import doctor_settings

        worker = get_current_worker()
        config = app_of(self).session.config
        inspect = app_of(self).services.doctor()

        def progress(done: int, total: int, _path: Path) -> None:
            self.post_message(DoctorProgress(done, total))

        report = inspect([dataset_spec(config, folder)], doctor_settings(config), progress=progress,
                         stop=worker.cancelled_event)
        return folder, report

    def action_cancel_check(self) -> None:
        self.workers.cancel_group(self, "doctor")

    @on(DoctorProgress)
    def _progress(self, message: DoctorProgress) -> None:
        self.query_one("#check-progress", ProgressBar).update(total=message.total, progress=message.done)

    def worker_done(self, worker: Worker) -> None:
        if worker.group != "doctor" or worker.result is None:
            if worker.group == "doctor":
                self.query_one("#summary", Static).update("check did not finish")
            return
        folder, report = worker.result
        session = app_of(self).session
        session.report, session.report_folder = report, folder
        self.show_report(report, folder)

    def show_report(self, report: DoctorReport, folder: str) -> None:
        root = Path(folder)
        table = self.query_one("#clips", DataTable)
        table.clear()
        for clip in report.clips:
            table.add_row(*clip_row(clip, root))
        usable = sum(c.usable for c in report.clips)
        blocking, warnings = len(report.blocking), len(report.warnings)
        colour = "red" if blocking else ("yellow" if warnings else "green")
        cancelled = " [b]cancelled[/]" if report.cancelled else ""
        self.query_one("#summary", Static).update(
            f"[{colour}]{len(report.clips)} clips, {usable} usable, {report.windows} windows/epoch; "
            f"{blocking} blocking, {warnings} warnings[/]{cancelled}")
        self.query_one("#problems", Static).update(problems_text(report, root))
        bar = self.query_one("#check-progress", ProgressBar)
        bar.update(total=max(1, len(report.clips)), progress=len(report.clips))
        self._sync_train_button()

    @on(Input.Changed, "#folder")
    def _folder_typed(self) -> None:
        self.query_one("#in-config", Static).update(
            datasets_line(app_of(self).session.config, self.typed_folder()))
        self._sync_train_button()

    def _sync_train_button(self) -> None:
        self.query_one("#train", Button).disabled = not self._can_train()

    def _add(self, folder: str) -> bool:
        """The folder into the config's datasets (kept as it is when already there); False when nothing to add."""
        app = app_of(self)
        entries = [vars(d).copy() for d in app.session.config.data.datasets]
        if any(e["path"] == folder for e in entries):
            return False
        error = app.apply_settings({"data.datasets": [*entries, {"path": folder}]})
        if error:
            self.notify(error, title="Not added", severity="error", timeout=10)
            return False
        return True

    @on(Button.Pressed, "#add")
    def action_add_folder(self) -> None:
        folder = self.typed_folder()
        if not folder:
            self.notify("Type the dataset folder first.", severity="warning")
            return
        session = app_of(self).session
        if not self._add(folder):
            if any(d.path == folder for d in session.config.data.datasets):
                self.notify(f"{folder} is already in the run config (e edits its entry).")
            return
        report = session.report if session.report_folder == folder else None
        if report is None:
            self.notify(f"Added {folder} without a check: ctrl+r checks it; the run's own check phase will too.",
                        severity="warning", timeout=8)
        elif report.blocking:
            self.notify(f"Added {folder}, but its check found {len(report.blocking)} blocking problem(s): those "
                        "clips must be fixed or moved out before the run can start.", severity="warning", timeout=10)
        else:
            self.notify(f"Added {folder} to the run config's datasets.")

    @on(Button.Pressed, "#train")
    async def action_train(self) -> None:
        refusal = self._train_refusal()
        if refusal:
            self.notify(refusal, title="Not training yet", severity="warning", timeout=10)
            return
        self._add(self.typed_folder())
        await self.app.switch_mode("run")
        run_screen = self.app.screen
        assert isinstance(run_screen, RunScreen), f"the run mode shows {type(run_screen).__name__}"
        run_screen.action_start()
