"""New run: the three things a run needs that no preset can know (the model, the clips, a name), asked in one
dialog, so a newcomer never has to open the TOML file. "Tiny demo" makes a tiny S2V model and two synthetic talking
clips (what `s2v-tui demo` trains) and fills the dialog with them and the demo's CPU-sized settings: the whole app
can then be tried on a laptop in a minute.

It answers through `dismiss` with the settings to apply ({dotted key: value}), or None.
"""
from __future__ import annotations

import itertools
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static
from textual.worker import Worker, WorkerState

from engine.config import Config
from engine.model_source import source_problem

from s2v_tui.app_handle import WorkerContext, app_of

DEMO_FOLDER = Path("s2v-demo")
DEMO_GROUP = "demo-files"
NOTE_ENTRIES = 400


def make_demo_files(folder: Path) -> tuple[Path, Path]:
    """The tiny model and the demo clips under `folder` (what exists is kept); returns (model, clips)."""
    from engine.models.tiny import write_tiny_model

    from s2v_tui.commands.demo import make_demo_clips

    model = folder / "model"
    if not (model / "model_index.json").exists():
        write_tiny_model(model, seed=0)
    return model, make_demo_clips(folder / "clips")


def dataset_note(text: str) -> str:
    if not text:
        return "the folder of your clips, each with a caption <stem>.txt"
    path = Path(text).expanduser()
    if not path.is_dir():
        return f"{text} is not a folder here (the Dataset screen, 1, checks a folder)"
    # Counted on the UI thread as the name is typed: only the first entries, so a huge or slow folder never stalls it.
    entries = list(itertools.islice(path.iterdir(), NOTE_ENTRIES))
    videos = sum(1 for p in entries if p.suffix.lower() in (".mp4", ".mov", ".mkv", ".webm", ".avi"))
    more = "+" if len(entries) == NOTE_ENTRIES else ""  # stopped counting
    return f"{videos}{more} video file{'s' * (videos != 1)} in {text}; check them on the Dataset screen (1)"


class NewRunDialog(ModalScreen[dict | None]):
    DEFAULT_CSS = """
    NewRunDialog { align: center middle; }
    NewRunDialog > Vertical { width: 78; max-width: 98%; height: auto; max-height: 95%;
                              border: thick $accent; background: $surface; padding: 0 1; }
    NewRunDialog .new-field { height: auto; border-left: blank; }
    NewRunDialog .new-field:focus-within { border-left: outer $accent; }
    NewRunDialog .new-label { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    NewRunDialog .new-note { height: auto; color: $text-muted; }
    NewRunDialog #new-status { height: auto; margin-top: 1; }
    NewRunDialog #new-buttons { height: auto; align-horizontal: right; margin-top: 1; }
    NewRunDialog #new-buttons Button { margin-left: 1; }
    """
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="new_run.cancel", tooltip="Close; the config stays as it was"),
        Binding("ctrl+s", "use", "Use", id="new_run.use", tooltip="Put these into the run config"),
    ]

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.demo = False  # the fields hold the tiny demo's files: its settings come with them

    def compose(self) -> ComposeResult:
        c = self.config
        first = c.data.datasets[0].path if c.data.datasets else ""
        with Vertical() as box:
            box.border_title = "New run"
            for wid, label, value, tip in (
                    ("new-model", "model.source: the S2V model folder, or a hub id", c.model.source,
                     "A local folder in the diffusers layout (transformer/, vae/, ...) or e.g. Wan-AI/Wan2.2-S2V-14B"),
                    ("new-dataset", "dataset folder: the clips to train on", first,
                     "Folder of video clips, each with <stem>.txt (becomes the one [[data.datasets]] entry)"),
                    ("new-name", "output.name: the run's folder and LoRA name", c.output.name,
                     f"The run folder is {c.output.run_dir}/NAME")):
                with Vertical(classes="new-field"):
                    yield Static(f"[b]{label}[/]", classes="new-label")
                    yield Input(value, id=wid, compact=True, tooltip=tip)
                    yield Static("", id=f"{wid}-note", classes="new-note", markup=False)
            yield Static("No model or clips yet? Tiny demo makes a tiny model and two talking clips to try the app "
                         "on the CPU.", id="new-status", markup=False)
            with Horizontal(id="new-buttons"):
                yield Button("Tiny demo", id="new-demo", tooltip=f"Write a tiny model and clips into ./{DEMO_FOLDER}")
                yield Button("Cancel", id="new-cancel", tooltip="Close (esc)")
                yield Button("Use", id="new-use", variant="primary", tooltip="Put these into the run config (ctrl+s)")

    def on_mount(self) -> None:
        self.query_one("#new-model", Input).focus()
        self._notes()

    def _notes(self) -> None:
        model = self.query_one("#new-model", Input).value.strip()
        problem = source_problem(model) if model else "give the model folder or a hub id"
        self.query_one("#new-model-note", Static).update(
            problem or ("a local folder" if Path(model).expanduser().is_dir() else
                        "a hub id: downloaded at the load phase (needs the network)"))
        folder = self.query_one("#new-dataset", Input).value.strip()
        self.query_one("#new-dataset-note", Static).update(dataset_note(folder))
        name = self.query_one("#new-name", Input).value.strip()
        taken = name and (Path(self.config.output.run_dir) / name).exists()
        self.query_one("#new-name-note", Static).update(
            f"{self.config.output.run_dir}/{name} exists: starting asks whether to continue it or start another"
            if taken else f"the run goes to {self.config.output.run_dir}/{name or 'NAME'}")

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._notes()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.focus_next()

    # -- the tiny demo ---------------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group=DEMO_GROUP, name="tiny demo files")
    def write_demo(self, folder: Path) -> tuple[Path, Path]:
        return make_demo_files(folder)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        app_of(self).handle_worker_state(event)

    def worker_done(self, worker: Worker) -> None:
        """Called by the app's one worker handler (a failure it reports itself)."""
        self.query_one("#new-demo", Button).disabled = False
        if worker.state != WorkerState.SUCCESS or worker.result is None:
            self.query_one("#new-status", Static).update("the demo files were not written")
            return
        model, clips = worker.result
        self.query_one("#new-model", Input).value = str(model)
        self.query_one("#new-dataset", Input).value = str(clips)
        self.query_one("#new-name", Input).value = "demo-lora"
        self.demo = True
        self.query_one("#new-status", Static).update(
            f"Tiny demo ready in {model.parent}: Use applies it with the demo's settings (64x64 clips, 120 steps, "
            "fp32 on the CPU).")
        self.query_one("#new-use", Button).focus()

    # -- answers ---------------------------------------------------------------------------------------------

    def settings(self) -> dict:
        from s2v_tui.commands.demo import DEMO_SETTINGS

        values = {"model.source": self.query_one("#new-model", Input).value.strip(),
                  "data.datasets": [{"path": self.query_one("#new-dataset", Input).value.strip()}],
                  "output.name": self.query_one("#new-name", Input).value.strip()}
        return {**DEMO_SETTINGS, **values} if self.demo else values

    def problem(self) -> str:
        values = self.settings()
        if not values["model.source"]:
            return "give the model folder or a hub id"
        if source_problem(values["model.source"]):
            return str(source_problem(values["model.source"]))
        if not values["data.datasets"][0]["path"]:
            return "give the dataset folder"
        if not values["output.name"]:
            return "give the run a name"
        return ""

    def action_use(self) -> None:
        problem = self.problem()
        if problem:
            self.query_one("#new-status", Static).update(f"Not yet: {problem}.")
            return
        self.dismiss(self.settings())

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "new-demo":
            event.button.disabled = True
            self.query_one("#new-status", Static).update(f"writing a tiny model and two clips into ./{DEMO_FOLDER} ...")
            worker = self.write_demo(DEMO_FOLDER.resolve())
            app_of(self).worker_contexts[worker] = WorkerContext("writing the tiny demo files")
        elif event.button.id == "new-use":
            self.action_use()
        else:
            self.action_cancel()
