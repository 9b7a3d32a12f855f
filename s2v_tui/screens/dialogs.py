"""Modal questions and the failure report. Each modal answers through `dismiss`, so callers stay linear."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

STOP = "stop"
KEEP = "keep"


class _Dialog(ModalScreen[str]):
    DEFAULT_CSS = """
    _Dialog { align: center middle; }
    _Dialog > Vertical { width: 70; max-width: 95%; height: auto; max-height: 90%;
                         border: thick $accent; background: $surface; padding: 0 1; }
    _Dialog .question { margin: 1 0; }
    _Dialog Horizontal { height: auto; align-horizontal: right; }
    _Dialog Button { margin-left: 1; }
    """
    BINDINGS = [Binding("escape", "dismiss('keep')", "Cancel", id="dialog.cancel", tooltip="Close, change nothing")]

    def __init__(self, title: str, question: str, buttons: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self._title = title
        self._question = question
        self._buttons = buttons  # (answer, label, variant)

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = self._title
            yield Static(self._question, classes="question", markup=False)
            with Horizontal():
                for answer, label, variant in self._buttons:
                    yield Button(label, id=f"answer-{answer}", variant=variant)  # type: ignore[arg-type]

    def on_mount(self) -> None:
        self.query(Button).last().focus()  # the safe answer is last and takes Enter

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss((event.button.id or "").removeprefix("answer-"))


class ConfirmStop(_Dialog):
    """Stop asks first: the engine always writes a checkpoint at the next step boundary before it returns."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(
            "Stop training?",
            f"The run is at step {step}/{total}. Stopping writes a checkpoint at the next step boundary; "
            "the run can be resumed from it later.",
            [(STOP, "Checkpoint and stop", "error"), (KEEP, "Keep training", "primary")],
        )


class ConfirmQuit(_Dialog):
    """Quitting during a run started here: the run lives in this process, so it must stop (checkpointed)."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(
            "A run is in progress",
            f"Training in {run_dir} runs inside this app. Quit stops it with a checkpoint first, then exits. "
            "(If the connection drops instead, the run keeps going and `s2v-tui attach` finds it again.)",
            [(STOP, "Checkpoint, stop and quit", "error"), (KEEP, "Keep training", "primary")],
        )


class ErrorReport(ModalScreen[None]):
    """A worker failed: what, where the details are, and the run directory to look in."""

    DEFAULT_CSS = """
    ErrorReport { align: center middle; }
    ErrorReport > Vertical { width: 76; max-width: 95%; height: auto; max-height: 90%;
                             border: thick $error; background: $surface; padding: 0 1; }
    ErrorReport Static { margin: 1 0 0 0; }
    ErrorReport Button { margin: 1 0; }
    """
    BINDINGS = [Binding("escape", "dismiss", "Close", id="error.close", tooltip="Close this report")]

    def __init__(self, title: str, message: str, run_dir: str | None, log_path: str | None) -> None:
        super().__init__()
        self._title = title
        self._message = message
        self._run_dir = run_dir
        self._log_path = log_path

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = self._title
            yield Static(self._message, id="error-message", markup=False)
            if self._run_dir:
                yield Static(f"Run directory: {self._run_dir}", id="error-run-dir", markup=False)
            if self._log_path:
                yield Static(f"Traceback written to {self._log_path}", id="error-log", markup=False)
            yield Button("Close", id="error-close", variant="primary")

    def on_mount(self) -> None:
        self.query_one(Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(None)
