"""What the engine says while it runs: frozen event dataclasses and the bus that fans them out.

The engine reports only through these events. Every face (TUI bridge, headless reporter, JSONL writer) is a
subscriber on an `EventBus`; a process that did not start the run follows it by tailing `events.jsonl` with
`engine.event_log.follow_events` (that module imports this one, never the other way round). One event is one
strict JSON object on one line (a non-finite float is written as the string "NaN", "Infinity" or "-Infinity"),
tagged with its `kind`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_args, get_type_hints

log = logging.getLogger(__name__)

PHASES = ("check", "cache", "load", "train", "validate", "export", "done")
CHECKPOINT_REASONS = ("interval", "stop", "signal", "oom", "final", "host_memory")
# "refused": the job never started (a changed config on an existing run, a run folder in use); nothing was touched.
RUN_STATUSES = ("completed", "stopped", "failed", "refused")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TRACKERS = ("wandb", "webhooks", "hub")

EVENTS_FILENAME = "events.jsonl"


def _one_of(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")


# How a non-finite float is spelled in a JSON line: the names JavaScript and Python's own json module use.
NON_FINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [_strict(v) for v in value]
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Event:
    """Base of all events. `ts` is wall-clock seconds (time.time()) when the event was made."""

    kind: ClassVar[str] = "event"
    ts: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            data[f.name] = value
        return data

    def to_json(self) -> str:
        # NaN/inf losses are legal here (a skipped non-finite step reports its loss), but bare NaN/Infinity
        # tokens are not JSON and break other readers (jq, browsers); they go out as strings that
        # `event_from_dict` turns back into floats. Keys are sorted so two identical events give identical lines.
        return json.dumps(_strict(self.to_dict()), sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False)


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    run_dir: str
    config_hash: str
    total_steps: int
    resumed_from_step: int = 0  # 0 for a fresh run
    name: str = ""
    device: str = ""  # e.g. "cuda:0 NVIDIA H100 80GB HBM3" or "cpu"
    pid: int = field(default_factory=os.getpid)  # lets `attach` tell a live run from a dead one
    host: str = field(default_factory=platform.node)
    trainable_params: int = 0


@dataclass(frozen=True)
class PhaseChanged(Event):
    kind: ClassVar[str] = "phase_changed"
    phase: str
    detail: str = ""

    def __post_init__(self) -> None:
        _one_of(self.phase, PHASES, "phase")


@dataclass(frozen=True)
class StepEnd(Event):
    """One optimizer step (after gradient accumulation). Memory fields are None where not measurable (CPU)."""

    kind: ClassVar[str] = "step_end"
    step: int
    total_steps: int
    epoch: int
    loss: float
    loss_smooth: float
    lr: float
    grad_norm: float | None = None
    samples_per_s: float = 0.0
    s_per_step: float = 0.0  # the recent median, warm-up left out (engine.train.metrics.StepTimer)
    eta_s: float | None = None  # None until a step after the warm-up has been timed
    step_s: float = 0.0  # this step's own duration
    peak_alloc_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    host_rss_bytes: int | None = None
    skipped_nonfinite: int = 0  # total steps skipped for a NaN/inf loss or gradient so far
    # Several processes (one per GPU): each rank's memory, in rank order (the fields above are rank 0's); empty
    # in a single-process run. None where not measurable, as above.
    rank_peak_alloc_bytes: tuple[int | None, ...] = ()
    rank_peak_reserved_bytes: tuple[int | None, ...] = ()
    rank_host_rss_bytes: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint_saved"
    step: int
    path: str
    reason: str = "interval"

    def __post_init__(self) -> None:
        _one_of(self.reason, CHECKPOINT_REASONS, "checkpoint reason")


@dataclass(frozen=True)
class ValidationDone(Event):
    kind: ClassVar[str] = "validation_done"
    step: int
    sample_paths: tuple[str, ...] = ()
    eval_loss: float | None = None


@dataclass(frozen=True)
class RunWarning(Event):
    """A problem the run survives. `code` is stable (e.g. "cache_missing"), for grouping and tests."""

    kind: ClassVar[str] = "warning"
    code: str
    message: str


# The design documents call it `Warning`; the alias keeps that name without hiding the builtin in this module.
Warning = RunWarning  # noqa: A001


@dataclass(frozen=True)
class LogLine(Event):
    kind: ClassVar[str] = "log"
    level: str
    message: str

    def __post_init__(self) -> None:
        _one_of(self.level, LOG_LEVELS, "log level")


@dataclass(frozen=True)
class RunEnded(Event):
    kind: ClassVar[str] = "run_ended"
    status: str
    reason: str = ""
    outputs: Mapping[str, str] = field(default_factory=dict)  # format name -> file path, e.g. {"peft": ...}

    def __post_init__(self) -> None:
        _one_of(self.status, RUN_STATUSES, "run status")


@dataclass(frozen=True)
class TrackerStatus(Event):
    """Where a service outside the run folder stands (engine.train.trackers), for a status line: `state` is a
    short word ("running", "done", "failed", ...), `detail` the rest (a run id, counts, the command to retry).
    It may come from a background thread, and after RunEnded while an upload finishes."""

    kind: ClassVar[str] = "tracker_status"
    tracker: str
    state: str
    detail: str = ""

    def __post_init__(self) -> None:
        _one_of(self.tracker, TRACKERS, "tracker")


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (RunStarted, PhaseChanged, StepEnd, CheckpointSaved, ValidationDone, RunWarning, LogLine, RunEnded,
                TrackerStatus)
}


_TUPLE_FIELDS: dict[type[Event], tuple[str, ...]] = {
    ValidationDone: ("sample_paths",),
    StepEnd: ("rank_peak_alloc_bytes", "rank_peak_reserved_bytes", "rank_host_rss_bytes"),
}


def _holds_float(tp: Any) -> bool:
    return tp is float or any(_holds_float(arg) for arg in get_args(tp))


@functools.cache
def _float_fields(cls: type[Event]) -> frozenset[str]:
    """Fields typed float (or float | None, or a tuple of them): where a "NaN"/"Infinity" string means a float."""
    hints = get_type_hints(cls)
    return frozenset(f.name for f in dataclasses.fields(cls) if _holds_float(hints[f.name]))


def _float_back(value: Any) -> Any:
    if isinstance(value, str):
        return NON_FINITE_NAMES.get(value, value)
    if isinstance(value, list):
        return [_float_back(v) for v in value]
    return value


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Rebuild an event from its dict form. Unknown fields are ignored so a newer writer does not break an
    older reader; an unknown kind or a missing required field raises ValueError."""
    kind = data.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names}
    for name in _float_fields(cls) & kwargs.keys():
        kwargs[name] = _float_back(kwargs[name])
    for name in _TUPLE_FIELDS.get(cls, ()):  # JSON has lists; the frozen events hold tuples
        if name in kwargs:
            kwargs[name] = tuple(kwargs[name])
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required field
        raise ValueError(f"bad {kind} event: {exc}") from None


def event_from_json(line: str) -> Event:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON line: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("event line is not a JSON object")
    return event_from_dict(data)


Subscriber = Callable[[Event], None]


class EventBus:
    """Fans each event out to subscriber callables, in subscription order, on the emitting thread.

    Subscribers must be quick (the TUI bridge only posts a message). One that raises is logged and detached:
    a broken display must never stop a training run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add `fn`; returns a function that removes it again."""
        with self._lock:
            self._subscribers.append(fn)
        return lambda: self.unsubscribe(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        with self._lock:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        with self._lock:
            return tuple(self._subscribers)

    def emit(self, event: Event) -> None:
        # Iterate over a copy: subscribers may (un)subscribe, or emit, from inside their callback.
        for fn in self.subscribers:
            try:
                fn(event)
            except Exception:
                log.exception("event subscriber %r failed on %s; detached", fn, event.kind)
                self.unsubscribe(fn)


class LogRecordsToEvents(logging.Handler):
    """Logging handler that turns engine log records into `LogLine` events on a bus, for the TUI log pane.

    Attach it to the "engine" logger for the duration of a run. A thread-local guard stops the loop a failing
    subscriber would otherwise make (the bus logs the failure, which would come back here)."""

    def __init__(self, bus: EventBus, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.bus = bus
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            level = record.levelname.lower()
            if level not in LOG_LEVELS:
                level = "info"
            self.bus.emit(LogLine(level=level, message=self.format(record), ts=record.created))
        except Exception:
            self.handleError(record)
        finally:
            self._local.busy = False


__all__ = [
    "CHECKPOINT_REASONS",
    "EVENTS_FILENAME",
    "EVENT_TYPES",
    "LOG_LEVELS",
    "NON_FINITE_NAMES",
    "PHASES",
    "RUN_STATUSES",
    "CheckpointSaved",
    "Event",
    "EventBus",
    "LogLine",
    "LogRecordsToEvents",
    "PhaseChanged",
    "RunEnded",
    "RunStarted",
    "RunWarning",
    "StepEnd",
    "Subscriber",
    "TRACKERS",
    "TrackerStatus",
    "ValidationDone",
    "event_from_dict",
    "event_from_json",
]
