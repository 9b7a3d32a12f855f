"""The runs under a runs folder, summarised from the head and tail of each events.jsonl (never the whole
file: a long run's log is large, and this list is built while the user waits)."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from engine.events import EVENTS_FILENAME, RunEnded, RunStarted, StepEnd, event_from_json

TAIL_BYTES = 256 * 1024


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    name: str
    status: str  # running, completed, stopped, failed, gone (its process died), unknown
    step: int
    total_steps: int
    host: str
    mtime: float


def _lines(path: Path) -> tuple[str, list[str]]:
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", "replace")
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read().decode("utf-8", "replace").split("\n")
    return first, tail[1:] if size > TAIL_BYTES else tail  # the first tail line may be cut


def _parse(line: str):
    try:
        return event_from_json(line) if line.strip() else None
    except ValueError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def summarise(run_dir: Path) -> RunSummary | None:
    path = run_dir / EVENTS_FILENAME
    try:
        first, tail = _lines(path)
        mtime = path.stat().st_mtime
    except OSError:
        return None
    started = _parse(first)
    events = [e for e in map(_parse, tail) if e is not None]
    for e in reversed(events):  # a resumed run starts again inside the same file
        if isinstance(e, RunStarted):
            started = e
            break
    step = total = 0
    status = "unknown"
    if isinstance(started, RunStarted):
        status, total, step = "running", started.total_steps, started.resumed_from_step
        if started.host == platform.node() and not _alive(started.pid):
            status = "gone"
    for e in events:
        if isinstance(e, StepEnd):
            step, total = e.step, e.total_steps
        elif isinstance(e, RunEnded):
            status = e.status
        elif isinstance(e, RunStarted) and e is started:
            status = "running" if status not in ("gone",) else status
    name = started.name if isinstance(started, RunStarted) and started.name else run_dir.name
    host = started.host if isinstance(started, RunStarted) else ""
    return RunSummary(run_dir, name, status, step, total, host, mtime)


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """Every run folder directly under `runs_dir` (or `runs_dir` itself), newest first."""
    candidates = [runs_dir] + (sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else [])
    found = [s for s in (summarise(p) for p in candidates if (p / EVENTS_FILENAME).is_file()) if s is not None]
    return sorted(found, key=lambda s: -s.mtime)
