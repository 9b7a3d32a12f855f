"""The command palette (ctrl+p): every screen, the main actions of the app, and the actions of the screen shown.

A Provider of our own rather than the system commands built from `active_bindings`: those drop every binding
whose key the focused widget takes as text (a text box takes the digits), so with the folder box focused the
palette listed no screen at all, and it filled up with the text box's own editing commands instead.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from s2v_tui.widgets.nav import SCREENS

# The actions worth reaching from any screen: (title, screen to show, action run there, help).
MAIN_ACTIONS = (
    ("New run: model, dataset folder and name (or a tiny demo)", None, "app.new_run",
     "Set up a run step by step; can make a tiny CPU model and clips to try the app"),
    ("Check the dataset folder", "dataset", "check", "Run the dataset doctor with the run config's settings"),
    ("Edit the datasets of the run", None, "app.edit_list('data.datasets')",
     "Add, remove and edit the [[data.datasets]] entries"),
    ("Edit the validation cases", None, "app.edit_list('validation.cases')",
     "Add, remove and edit the [[validation.cases]] entries"),
    ("Save the config", "config", "save", "Write the run config to its TOML file (keeps its comments)"),
    ("Start training", "run", "start", "Start (or continue) the run of the current config"),
    ("Follow a run started elsewhere", "attach", "refresh_runs", "List the runs under the runs folder"),
)


class S2VCommands(Provider):
    def _commands(self) -> Iterator[tuple[str, Callable[[], object], str]]:
        app = self.app
        for mode, key, label in SCREENS:
            yield f"Go to the {label} screen ({key})", partial(app.switch_mode, mode), f"Show the {label} screen"
        for title, mode, action, help_text in MAIN_ACTIONS:
            yield title, partial(self._run, mode, action), help_text
        screen = self.screen
        label = next((lab for mode, _, lab in SCREENS if getattr(app, "current_mode", None) == mode), "")
        for binding in getattr(type(screen), "BINDINGS", ()):
            if not getattr(binding, "description", "") or binding.action.startswith("app."):
                continue
            if screen.check_action(binding.action, ()) is False:
                continue
            yield (f"{label or 'This screen'}: {binding.description} ({binding.key})",
                   partial(app.run_action, binding.action, screen), binding.tooltip or binding.description)

    async def _run(self, mode: str | None, action: str) -> None:
        app = self.app
        if mode is not None and getattr(app, "current_mode", None) != mode:
            await app.switch_mode(mode)
        await app.run_action(action, app.screen if mode is not None else app)

    async def discover(self) -> Hits:
        for title, command, help_text in self._commands():
            yield DiscoveryHit(title, command, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, command, help_text in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), command, help=help_text)
