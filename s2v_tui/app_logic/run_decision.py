"""Before the app starts a run: would the engine start it new, resume it, continue it, or refuse it?

The engine decides (`engine.run_folder.resolve`, asked with write=False so nothing in the folder changes); this
module only turns its answer into a question for the user when there is one to ask. Headless, the same answer
is the exit code 2 and the list of keys; in the app it is a dialog (screens/run_decision.py), because a changed
config on an existing run is a choice the user makes, not a line that scrolls off the log.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit

from engine.config import Config, ConfigChange

CHANGES_SHOWN = 10


@dataclass(frozen=True)
class Decision:
    """A run folder that already holds trained state, and how the config given differs from it."""

    run_dir: Path
    kind: str  # "continue" (the engine would continue it), "refused" (it would not), "finished" (nothing to do)
    changes: tuple[ConfigChange, ...]
    step: int  # the step the folder is trained to; -1 when only exported LoRAs tell it is trained
    reason: str  # the engine's own words (a refusal), or its notes for a continuation
    proposed_name: str  # a free name beside it, for a new run

    @property
    def can_continue(self) -> bool:
        return self.kind == "continue"


def decide(config: Config, run_dir: Path) -> Decision | None:
    """None when the run just starts (a new folder, an untrained one, or the same run to resume); otherwise what
    the user must decide. Reads the folder only (a thread worker calls it: a checkpoint record may be on a slow
    disk). engine.run_folder is imported here, in that thread: it brings torch, which the app's start does without."""
    from engine.run_folder import ConfigRefused, free_run_name, resolve

    try:
        resolution = resolve(config, run_dir, write=False)
    except ConfigRefused as exc:
        return Decision(run_dir, "refused", tuple(exc.changes), _step(run_dir), str(exc), free_run_name(run_dir))
    if resolution.action == "continue":
        return Decision(run_dir, "continue", resolution.changes, resolution.step, " ".join(resolution.notes),
                        free_run_name(run_dir))
    if resolution.action == "resume" and resolution.step >= resolution.config.optim.max_steps > 0:
        # The same run, already at its last step: "resuming" it only reports "completed" again.
        return Decision(run_dir, "finished", (), resolution.step, "", free_run_name(run_dir))
    return None


def _step(run_dir: Path) -> int:
    from engine.train import checkpoint as ckpt

    found = ckpt.list_checkpoints(run_dir)
    return found[0][0] if found else -1


def value_text(value: Any, width: int = 40) -> str:
    """A config value as TOML, cut to `width` characters (a list of datasets is long)."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = tomlkit.item(value).as_string()
    except (TypeError, ValueError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def change_lines(changes: tuple[ConfigChange, ...], limit: int = CHANGES_SHOWN) -> list[str]:
    lines = [f"{c.key}: {value_text(c.old)} -> {value_text(c.new)}" for c in changes[:limit]]
    if len(changes) > limit:
        lines.append(f"... and {len(changes) - limit} more")
    return lines


def trained_text(step: int) -> str:
    return f"trained to step {step}" if step >= 0 else "with exported LoRAs"
