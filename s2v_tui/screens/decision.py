"""The question asked before a run starts in a folder that already holds a trained run with other settings:
continue it (where the engine allows the change), start a new run under another name, or cancel.

It answers through `dismiss`: ("continue", "") , ("new", NAME) or None (cancel, the safe answer, focused).
"""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from engine.config import Config, ConfigError, check_config, with_value

from s2v_tui.app_logic.run_decision import Decision, change_lines, trained_text

CONTINUE, NEW = "continue", "new"
WHAT_MAY_CHANGE = ("only optim.max_steps (more steps), the memory placement, logging, checkpoint and export "
                   "settings may change on a trained run")


def explanation(d: Decision) -> str:
    where = f"{d.run_dir} already holds a run {trained_text(d.step)}"
    if d.kind == "finished":
        return (f"{where}, as many steps as optim.max_steps asks: starting it again would only report it "
                "completed. Raise optim.max_steps (Config screen, 3) to train it longer, or start a new run.")
    count = f"{len(d.changes)} key{'s' * (len(d.changes) != 1)}"
    if d.kind == "continue":
        return f"{where}. The config differs from it in {count}; these changes can continue it:"
    if d.changes:
        return f"{where}. The config differs from it in {count}, and {WHAT_MAY_CHANGE}:"
    return f"{where}, and it cannot be resumed with this config: {d.reason}"


class RunDecisionDialog(ModalScreen[tuple[str, str] | None]):
    DEFAULT_CSS = """
    RunDecisionDialog { align: center middle; }
    RunDecisionDialog > Vertical { width: 78; max-width: 98%; height: auto; max-height: 95%;
                                   border: thick $warning; background: $surface; padding: 0 1; }
    RunDecisionDialog #decision-why { height: auto; margin-top: 1; }
    RunDecisionDialog #decision-changes { height: auto; max-height: 8; margin: 0 0 0 2; }
    RunDecisionDialog #decision-changes Static { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    RunDecisionDialog #name-row { height: 3; margin-top: 1; }
    RunDecisionDialog #name-row Label { padding: 1 1 0 0; }
    RunDecisionDialog #new-name { width: 1fr; }
    RunDecisionDialog #name-error { height: auto; color: $error; }
    RunDecisionDialog #decision-buttons { height: auto; align-horizontal: right; }
    RunDecisionDialog #decision-buttons Button { margin-left: 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="decision.cancel", tooltip="Start nothing, change nothing")]

    def __init__(self, decision: Decision, config: Config) -> None:
        super().__init__()
        self.decision = decision
        self.config = config

    def compose(self) -> ComposeResult:
        d = self.decision
        with Vertical() as box:
            box.border_title = "This run folder already holds a run"
            yield Static(explanation(d), id="decision-why", markup=False)
            with VerticalScroll(id="decision-changes"):
                for line in change_lines(d.changes):
                    yield Static(line, markup=False, classes="change")
            with Horizontal(id="name-row"):
                yield Label("New run name:")
                yield Input(d.proposed_name, id="new-name",
                            tooltip="The folder of the new run under output.run_dir (output.name)")
            yield Static("", id="name-error", markup=False)
            with Horizontal(id="decision-buttons"):
                if d.can_continue:
                    yield Button("Continue" + (f" from step {d.step}" if d.step >= 0 else ""), id="answer-continue",
                                 variant="warning",
                                 tooltip="Train on in the same folder with the changed keys")
                yield Button("Start new run", id="answer-new", variant="primary",
                             tooltip="Train from scratch in a new folder under the name above")
                yield Button("Cancel", id="answer-cancel", tooltip="Start nothing (esc)")

    def on_mount(self) -> None:
        self.query_one("#answer-cancel", Button).focus()  # the safe answer takes Enter

    def new_name_problem(self, name: str) -> str:
        if not name:
            return "give the new run a name"
        if name == self.decision.run_dir.name:
            return f"{name} is the run folder above; give another name"
        try:
            candidate = with_value(self.config, "output.name", name, "<new run name>")
        except ConfigError as exc:
            return exc.message
        errors = [e for e in check_config(candidate, "<new run name>") if e.key == "output.name"]
        return errors[0].message if errors else ""

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.query_one("#name-error", Static).update(self.new_name_problem(event.value.strip()))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._answer_new()

    def _answer_new(self) -> None:
        name = self.query_one("#new-name", Input).value.strip()
        problem = self.new_name_problem(name)
        if problem:
            self.query_one("#name-error", Static).update(problem)
            return
        self.dismiss((NEW, name))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        answer = (event.button.id or "").removeprefix("answer-")
        if answer == NEW:
            self._answer_new()
        elif answer == CONTINUE:
            self.dismiss((CONTINUE, ""))
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
