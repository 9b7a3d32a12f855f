"""The checkpoints of the run a screen follows (Run and Runs screens): step, losses, LoRA files, samples.

The screen hands over a function that returns its RunSnapshot. Twice a second the widget compares what the
snapshot says about checkpoints (run folder, newest checkpoint, validation results, status) with what it listed
last, and only when that changed lists the folder again, in a thread worker: engine.run_checkpoints reads the
digest records and scans events.jsonl for validations, work for neither the UI thread nor the paint rate. It takes
no room (display: none) until the run has a checkpoint. Below the table: the highlighted checkpoint's LoRA file
and the command that samples with it; Enter copies the command (OSC 52: most terminals, over SSH too).
"""
from __future__ import annotations

import shlex
from collections.abc import Callable
from functools import partial
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static
from textual.worker import Worker, WorkerState

from engine.run_checkpoints import CheckpointInfo, list_run_checkpoints

from s2v_tui.app_handle import app_of
from s2v_tui.app_logic.fmt import number
from s2v_tui.app_logic.run_model import RunSnapshot

POLL_S = 0.5
GROUP = "checkpoints"
SHARE = 0.15  # of the screen's height for the table: at 80x24 the run panels above keep their 3 log lines


def sample_command(info: CheckpointInfo) -> str:
    """The `s2v-tui sample` command with this checkpoint's LoRA, its inputs left for the user to fill in."""
    return (f"s2v-tui sample --model {shlex.quote(info.model or 'MODEL')} --lora {shlex.quote(info.reference)} "
            f"--image FACE.png --audio SPEECH.wav --prompt TEXT --out step-{info.step}.mp4")


class CheckpointList(Vertical):
    DEFAULT_CSS = """
    CheckpointList { height: auto; display: none; }
    CheckpointList.-listed { display: block; }
    CheckpointList DataTable { height: 3; }
    CheckpointList .detail { height: 1; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    CheckpointList #checkpoint-lora { color: $text-muted; }
    """

    def __init__(self, source: Callable[[], RunSnapshot | None], *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self._source = source
        self._listed_for: tuple | None = None
        self.checkpoints: list[CheckpointInfo] = []

    def compose(self) -> ComposeResult:
        table = DataTable(id="checkpoints-table", cursor_type="row")
        table.add_columns("checkpoint", "loss", "eval loss", "LoRA", "samples", "")
        yield table
        yield Static("", id="checkpoint-lora", classes="detail", markup=False)
        yield Static("", id="checkpoint-command", classes="detail", markup=False)

    def on_mount(self) -> None:
        self.set_interval(POLL_S, self.poll, name="checkpoints-poll")
        self.poll()

    def poll(self) -> None:
        snap = self._source()
        key = None if snap is None or not snap.run_dir else (
            snap.run_dir, snap.checkpoint_step, snap.checkpoint_path, snap.eval_loss, snap.sample_paths, snap.status)
        if key == self._listed_for:
            return
        self._listed_for = key
        if key is None:
            self._show([])
            return
        self.run_worker(partial(list_run_checkpoints, Path(snap.run_dir)), thread=True, exclusive=True, group=GROUP,
                        exit_on_error=False, name="list checkpoints")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        app_of(self).handle_worker_state(event)  # the app's one handler (base.py)

    def worker_done(self, worker: Worker) -> None:
        """Called by the app's handler when a listing has finished; a superseded one (cancelled) is dropped."""
        if worker.group == GROUP and worker.state == WorkerState.SUCCESS:
            self._show(worker.result)

    def _show(self, checkpoints: list[CheckpointInfo]) -> None:
        self.checkpoints = checkpoints
        table = self.query_one(DataTable)
        table.clear()
        for c in checkpoints:
            table.add_row(f"step {c.step}", number(c.loss), number(c.eval_loss),
                          " ".join(layout for layout, _ in c.loras) or "-", str(len(c.samples)) if c.samples else "-",
                          "" if c.healthy else f"damaged: {c.problem}", key=str(c.step))
        self.set_class(bool(checkpoints), "-listed")
        self._fit()
        self._describe(0 if checkpoints else None)

    def on_resize(self) -> None:
        self._fit()

    def _fit(self) -> None:
        # A fixed height, set here: with `height: auto` and a max-height on the table, the widget kept the room of
        # every row and left it blank.
        rows = int(self.app.size.height * SHARE) - 1  # one line is the header
        self.query_one(DataTable).styles.height = 1 + max(2, min(len(self.checkpoints), rows))

    @on(DataTable.RowHighlighted, "#checkpoints-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._describe(event.cursor_row)

    def _describe(self, row: int | None) -> None:
        info = self.checkpoints[row] if row is not None and 0 <= row < len(self.checkpoints) else None
        lora = samples = command = ""
        if info is not None:
            lora = f"LoRA {info.loras[0][1]}" if info.loras else f"step {info.step} has no LoRA file"
            samples = f"   samples in {info.samples[0].parent}" if info.samples else ""
            command = f"enter copies: {sample_command(info)}"
        self.query_one("#checkpoint-lora", Static).update(lora + samples)
        self.query_one("#checkpoint-command", Static).update(command)

    @on(DataTable.RowSelected, "#checkpoints-table")
    def _selected(self, event: DataTable.RowSelected) -> None:
        if 0 <= event.cursor_row < len(self.checkpoints):
            command = sample_command(self.checkpoints[event.cursor_row])
            self.app.copy_to_clipboard(command)
            self.notify(command, title="copied the sample command", timeout=10)
