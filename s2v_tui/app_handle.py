"""What the screens and widgets may ask of the app, in a module below both.

The app module imports every screen (its MODES), so a screen that imported the app back would make a loop. The
screens name the app through `AppHandle` instead: the members S2VApp has beyond Textual's App, typed, and held
against the real app by a test (tests/test_tui_units.py). `app_of(node)` is the one way a screen reaches them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

from engine.gpu import GpuSnapshot, HostMemory
from s2v_tui.services import Services
from s2v_tui.session import Session

if TYPE_CHECKING:  # annotations only
    from textual.dom import DOMNode
    from textual.worker import Worker

READINGS_GROUP = "readings"  # the hardware poll's worker group: its failures are not reported as a modal


@dataclass(frozen=True)
class Readings:
    """One poll of the hardware; replaced whole, so screens can compare and skip repaints."""

    gpus: tuple[GpuSnapshot, ...] = ()
    host: HostMemory | None = None
    nvml_reason: str = ""  # why there are no GPU readings ("" when there are)
    version: int = 0


@dataclass
class WorkerContext:
    """What the failure handler needs to know about a worker: what it was doing and where."""

    what: str
    run_dir: Path | None = None
    extra: dict = field(default_factory=dict)


@runtime_checkable
class AppHandle(Protocol):
    """The app as its screens see it (s2v_tui.app.S2VApp implements it)."""

    services: Services
    session: Session
    readings: Readings
    worker_contexts: dict[Worker, WorkerContext]

    def handle_worker_state(self, event: Worker.StateChanged) -> None: ...

    def training_active(self) -> bool: ...

    def apply_settings(self, settings: dict) -> str: ...

    def action_edit_list(self, key: str) -> None: ...


def app_of(node: DOMNode) -> AppHandle:
    """The S2VApp that `node` (a screen, dialog or widget) runs in, typed as its handle."""
    return cast(AppHandle, node.app)
