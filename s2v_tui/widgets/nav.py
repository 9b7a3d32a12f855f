"""The one-line bar of screens at the top: which screen is shown, and a click (or its number key) away."""
from __future__ import annotations

from textual.widgets import Static

SCREENS = (("dataset", "1", "Dataset"), ("presets", "2", "Presets"), ("config", "3", "Config"),
           ("run", "4", "Run"), ("attach", "5", "Runs"))


class NavBar(Static):
    DEFAULT_CSS = """
    NavBar { height: 1; background: $panel; color: $text-muted; padding: 0 1; }
    """

    def __init__(self, current: str) -> None:
        parts = []
        for mode, key, label in SCREENS:
            style = "bold reverse" if mode == current else ""
            text = f" {key} {label} "
            parts.append(f"[@click=app.switch_mode('{mode}')]" + (f"[{style}]{text}[/]" if style else text) + "[/]")
        super().__init__(" ".join(parts) + "   [dim]ctrl+p: all commands[/]", id="nav")
