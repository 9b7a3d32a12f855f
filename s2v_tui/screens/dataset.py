"""Dataset: pick a folder (or take it from the config), run the doctor in a thread worker, show every clip
and the problems grouped by code with their fix. A blocking problem disables Start."""
from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Button, DataTable, Footer, Input, ProgressBar, Static
from textual.worker import Worker, get_current_worker

from engine.config import with_value
from engine.data.discover import DatasetSpec
from engine.data.doctor import DoctorReport, DoctorSettings, problems_by_code
from engine.data.windows import BucketSettings, WindowSettings

from s2v_tui.screens.base import AppScreen
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


def doctor_settings(config) -> DoctorSettings:
    """The doctor checks what this config will train: its window length, crop, reference and audio rule."""
    d = config.data
    windows = WindowSettings(frames=d.frames, motion_frames=d.motion_frames,
                             max_windows=d.windows_per_clip or None)
    w, h = d.resolution
    buckets = BucketSettings(max_area=w * h, fixed=f"{w}x{h}" if d.bucket == "fixed" else None)
    return DoctorSettings(windows=windows, buckets=buckets, crop=d.crop, reference=d.reference,
                          allow_silent_audio=d.allow_silent_audio)


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
        Binding("ctrl+t", "train", "Train", id="dataset.train",
                tooltip="Use this folder and start training (needs a check without blocking problems)"),
        Binding("ctrl+c", "cancel_check", "Cancel check", show=False, id="dataset.cancel",
                tooltip="Stop a running check"),
    ]
    DEFAULT_CSS = """
    DatasetScreen #folder-row { height: 3; }
    DatasetScreen #folder { width: 1fr; }
    DatasetScreen #folder-row Button { min-width: 9; }
    DatasetScreen #check-progress { height: 1; padding: 0 1; }
    DatasetScreen #summary { height: 1; padding: 0 1; }
    DatasetScreen #clips { height: 1fr; min-height: 4; }
    DatasetScreen #problems-box { height: 1fr; min-height: 4; border: round $primary-darken-1; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield NavBar("dataset")
        with Horizontal(id="folder-row"):
            yield Input(placeholder="dataset folder (clips + captions)", id="folder",
                        tooltip="Folder of video clips, each with <stem>.txt or a metadata.jsonl row")
            yield Button("Check", id="check", variant="primary", tooltip="Run the dataset doctor (ctrl+r)")
            yield Button("Train", id="train", variant="success", disabled=True,
                         tooltip="Start training on this folder (ctrl+t)")
        yield ProgressBar(id="check-progress", show_eta=False)
        yield Static("no check yet", id="summary")
        table = DataTable(id="clips", cursor_type="row", zebra_stripes=True)
        table.add_columns(*CLIP_COLUMNS)
        yield table
        with VerticalScroll(id="problems-box") as box:
            box.border_title = "problems"
            yield Static("", id="problems")
        yield Footer()

    AUTO_FOCUS = "#clips"

    def on_mount(self) -> None:
        datasets = self.app.session.config.data.datasets  # type: ignore[attr-defined]
        if datasets and datasets[0].path:
            self.query_one("#folder", Input).value = datasets[0].path
        report = self.app.session.report  # type: ignore[attr-defined]
        if report is not None:
            self.show_report(report, self.app.session.report_folder)  # type: ignore[attr-defined]
        if not self.query_one("#folder", Input).value:
            self.query_one("#folder", Input).focus()

    # -- actions -------------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "train":
            return True if self._can_train() else None  # None: shown, greyed out
        return True

    def _can_train(self) -> bool:
        session = self.app.session  # type: ignore[attr-defined]
        return session.report is not None and not session.dataset_blocking and \
            session.report_folder == self.query_one("#folder", Input).value.strip()

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
        from s2v_tui.app import WorkerContext

        self.app.worker_contexts[worker] = WorkerContext(f"dataset check of {folder}")  # type: ignore[attr-defined]

    @work(thread=True, exclusive=True, exit_on_error=False, group="doctor", name="dataset doctor")
    def run_doctor(self, folder: str) -> tuple[str, DoctorReport]:
        worker = get_current_worker()
        settings = doctor_settings(self.app.session.config)  # type: ignore[attr-defined]
        inspect = self.app.services.doctor()  # type: ignore[attr-defined]

        def progress(done: int, total: int, _path: Path) -> None:
            self.post_message(DoctorProgress(done, total))

        report = inspect([DatasetSpec(Path(folder))], settings, progress=progress, stop=worker.cancelled_event)
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
        session = self.app.session  # type: ignore[attr-defined]
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
    def _sync_train_button(self) -> None:
        self.query_one("#train", Button).disabled = not self._can_train()
        self.refresh_bindings()

    @on(Button.Pressed, "#train")
    async def action_train(self) -> None:
        if not self._can_train():
            self.notify("Check the folder first; blocking problems must be fixed before training.",
                        severity="warning")
            return
        session = self.app.session  # type: ignore[attr-defined]
        folder = session.report_folder
        session.config = with_value(session.config, "data.datasets", [{"path": folder}])
        await self.app.switch_mode("run")
        self.app.screen.action_start()  # type: ignore[attr-defined]
