"""The base of every screen: forwards worker state changes to the app's one handler.

Worker.StateChanged does not bubble, so each node that starts workers must pass it on; the logic (failure
modal, traceback to the run's train.log, the per-screen `worker_done` hook) stays in one place, the app.
"""
from __future__ import annotations

from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker


class AppScreen(Screen):
    # Digits switch screens, but a text box takes them as text: Escape leaves the box first.
    BINDINGS = [Binding("escape", "leave_field", "Leave field", show=False, id="screen.leave_field",
                        tooltip="Move focus out of the text box so the screen keys (1-5) work")]

    def action_leave_field(self) -> None:
        self.set_focus(None)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.app.handle_worker_state(event)  # type: ignore[attr-defined]
