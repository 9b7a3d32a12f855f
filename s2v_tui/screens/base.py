"""The base of every screen: forwards worker state changes to the app's one handler.

Worker.StateChanged does not bubble, so each node that starts workers must pass it on; the logic (failure
modal, traceback to the run's train.log, the per-screen `worker_done` hook) stays in one place, the app.
"""
from __future__ import annotations

from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Input
from textual.worker import Worker

from s2v_tui.app_handle import app_of


class AppScreen(Screen):
    # The screen keys (digits, letters) are bindings that a focused text box takes as text first (Textual's
    # check_consume_key), so typing a path never switches screens or starts anything. Escape leaves the box,
    # and the footer says so while one is focused.
    BINDINGS = [Binding("escape", "leave_field", "Leave field", id="screen.leave_field",
                        tooltip="Move focus out of the text box so the screen keys (1-5, letters) work")]

    def action_leave_field(self) -> None:
        self.set_focus(None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "leave_field":
            return isinstance(self.focused, Input)  # False: neither shown nor bound (Esc is free elsewhere)
        return True

    def config_changed(self) -> None:
        """The session's config was changed from outside this screen (a dialog): show it. Screens override."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        app_of(self).handle_worker_state(event)
