"""What the engine says while it runs: frozen event dataclasses, the bus that fans them out, and the JSONL log.

The engine reports only through these events. Every face (TUI bridge, headless reporter, JSONL writer) is a
subscriber on an `EventBus`; a process that did not start the run follows it by tailing `events.jsonl` with
`follow_events`. One event is one strict JSON object on one line (a non-finite float is written as the string
"NaN", "Infinity" or "-Infinity"), tagged with its `kind`.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import platform
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_args, get_type_hints

log = logging.getLogger(__name__)

PHASES = ("check", "cache", "load", "train", "validate", "export", "done")
CHECKPOINT_REASONS = ("interval", "stop", "signal", "oom", "final", "host_memory")
# "refused": the job never started (a changed config on an existing run, a run folder in use); nothing was touched.
RUN_STATUSES = ("completed", "stopped", "failed", "refused")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

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


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (RunStarted, PhaseChanged, StepEnd, CheckpointSaved, ValidationDone, RunWarning, LogLine, RunEnded)
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


def _write_some(fd: int, data: memoryview) -> int:
    """One os.write (it may write less than asked). Tests patch it to inject a full disk or a short write."""
    return os.write(fd, data)


def _fsync(fd: int) -> None:
    """os.fsync, here so that tests can make it fail."""
    os.fsync(fd)


def _cause(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


_LOST = object()  # stands in the pending lines where dropped ones were, until it is written as a warning


class JsonlEventWriter:
    """Subscriber that appends each event to `run_dir/events.jsonl`.

    Each line goes straight to the file (no buffer in this process) so a follower sees it at once; checkpoint and
    end events are also fsynced, so the log on disk is at least as new as the newest checkpoint after a power
    loss.

    A write that fails (a disk full for a moment, a quota, a network mount that hiccups) never leaves `__call__`:
    the bus would detach the writer for good and `attach` would show a run that never ends. The unwritten lines
    wait in memory, in order, and every later event (and `close`) tries them again. At most `max_pending` wait;
    older ones are dropped and replaced by one `events_lost` warning line where they were. Each failure episode
    is logged once. Only opening the file in the constructor may raise: a run that cannot log does not start.
    """

    FSYNC_KINDS = frozenset({CheckpointSaved.kind, RunEnded.kind})
    MAX_PENDING = 10_000
    # After these the descriptor itself is suspect, so the next try reopens the file; after others (ENOSPC,
    # EDQUOT) it stays open and a line a short write left half done is finished where it stopped.
    _REOPEN_ERRNOS = frozenset({errno.EBADF, errno.EIO, errno.ESTALE})

    def __init__(self, run_dir: str | os.PathLike[str], filename: str = EVENTS_FILENAME,
                 max_pending: int = MAX_PENDING) -> None:
        if max_pending < 2:
            raise ValueError(f"max_pending must be at least 2; got {max_pending}")
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._closed = False
        self._pending: deque[Any] = deque()  # encoded lines not yet (fully) in the file, and _LOST markers
        self._head_done = 0  # bytes of _pending[0] already in the file
        self._lost = 0  # lines dropped since the last events_lost line
        self._fsync_due = False
        self._failing = ""  # the cause while in a failure episode
        self._fd: int | None = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._end_torn_line(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _end_torn_line(fd: int) -> None:
        # A process killed mid-write (or our own write cut short before a reopen) leaves a line without its
        # newline; appending straight after it would glue the next event onto the torn one and lose both.
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            _write_some(fd, memoryview(b"\n"))  # one byte: written whole or raises

    def __call__(self, event: Event) -> None:
        line = (event.to_json() + "\n").encode("utf-8")
        with self._lock:
            if self._closed:
                return
            self._pending.append(line)
            self._fsync_due |= event.kind in self.FSYNC_KINDS
            self._trim()
            news = self._try_write()
        # Logged outside the lock: the engine's log handler may send this record back here as a LogLine.
        if news:
            log.log(*news)

    def _trim(self) -> None:
        while len(self._pending) > self.max_pending:
            at = 1 if self._head_done else 0  # a line begun in the file must be finished, not dropped
            if self._pending[at] is not _LOST:
                self._pending.insert(at, _LOST)
            dropped = self._pending[at + 1]
            del self._pending[at + 1]
            if dropped is not _LOST:
                self._lost += 1

    def _lost_line(self) -> bytes:
        warning = RunWarning(code="events_lost", message=(
            f"{self._lost} events could not be written to {self.path} while writing failed ({self._failing}) "
            f"and are lost; the events before and after this one are complete"))
        return (warning.to_json() + "\n").encode("utf-8")

    def _drain(self) -> None:
        if self._fd is None:
            self._fd = self._open()
            self._head_done = 0  # _open ended the half line; the whole line goes again after it
        while self._pending:
            head = self._pending[0]
            if head is _LOST:
                if not self._lost:
                    self._pending.popleft()
                    continue
                head = self._lost_line()
            try:
                view = memoryview(head)
                while self._head_done < len(view):
                    self._head_done += _write_some(self._fd, view[self._head_done:])
            finally:
                # Once any of the marker is in the file its count is final; until then it stays a marker that
                # counts on, so a marker that failed never undercounts what the next drops lose.
                if self._head_done and self._pending[0] is _LOST:
                    self._pending[0] = head
                    self._lost = 0
            self._pending.popleft()
            self._head_done = 0
        if self._fsync_due:
            _fsync(self._fd)
            self._fsync_due = False

    def _try_write(self) -> tuple[Any, ...] | None:
        """Write what is pending; returns what to log about it, if anything (a failure starts or ends)."""
        try:
            self._drain()
        except OSError as exc:
            if self._fd is not None and exc.errno in self._REOPEN_ERRNOS:
                self._close_fd()
            first, self._failing = not self._failing, _cause(exc)
            if first:
                return (logging.WARNING, "cannot write %s (%s); keeping up to %d events in memory and trying again "
                        "with each new one", self.path, self._failing, self.max_pending)
            return None
        if self._failing:
            cause, self._failing = self._failing, ""
            return (logging.INFO, "%s is written again (it had failed: %s)", self.path, cause)
        return None

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        """Write what is pending one last time and close; never raises (what stays unwritten is logged)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._fsync_due = True
            news = self._try_write()
            unwritten = self._lost + sum(1 for line in self._pending if line is not _LOST)
            cause = self._failing
            self._pending.clear()
            self._close_fd()
        if news:
            log.log(*news)
        if unwritten:
            log.warning("%d events could not be written to %s (%s) and are lost", unwritten, self.path, cause)

    def __enter__(self) -> JsonlEventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_lines(lines: list[bytes], source: str, last_may_be_torn: bool) -> Iterator[Event]:
    for number, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        try:
            yield event_from_json(text)
        except ValueError as exc:
            if last_may_be_torn and number == len(lines):
                log.debug("%s: ignoring torn last line", source)
            else:
                log.warning("%s:%d: skipped event line: %s", source, number, exc)


def read_events(path: str | os.PathLike[str]) -> list[Event]:
    """All events of a finished or running log. A torn last line (the writer died mid-line) is ignored
    quietly; a bad line elsewhere is skipped with a logged warning."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    torn = not data.endswith(b"\n")
    return list(_parse_lines(lines, str(path), last_may_be_torn=torn))


def follow_events(
    path: str | os.PathLike[str],
    stop_event: threading.Event,
    poll_s: float = 0.25,
    from_start: bool = True,
) -> Iterator[Event]:
    """Yield events as another process appends them to `path`, until `stop_event` is set.

    Waits for the file to appear. Only complete lines are parsed; a partial last line is kept until its newline
    arrives. If the file is replaced or truncated (a new run in the same folder), reading restarts from its
    beginning. With `from_start=False` only events written after the call are yielded.
    """
    path = Path(path)
    handle = None
    identity: tuple[int, int] | None = None
    pending = b""
    # Only events written after this call: skip what exists now; a file that appears later is read whole.
    skip_existing = not from_start and path.exists()
    try:
        while not stop_event.is_set():
            if handle is None:
                try:
                    handle = open(path, "rb")  # noqa: SIM115 - closed in finally / on rotation
                except FileNotFoundError:
                    stop_event.wait(poll_s)
                    continue
                st = os.fstat(handle.fileno())
                identity = (st.st_dev, st.st_ino)
                pending = b""
                if skip_existing:
                    handle.seek(0, os.SEEK_END)
                    skip_existing = False
            chunk = handle.read()
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                yield from _parse_lines(complete, str(path), last_may_be_torn=False)
                continue
            # Nothing new: check whether the file was replaced or truncated before sleeping.
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is None or (st.st_dev, st.st_ino) != identity or st.st_size < handle.tell():
                handle.close()
                handle = None
                continue
            stop_event.wait(poll_s)
    finally:
        if handle is not None:
            handle.close()


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
    "JsonlEventWriter",
    "LogLine",
    "LogRecordsToEvents",
    "PhaseChanged",
    "RunEnded",
    "RunStarted",
    "RunWarning",
    "StepEnd",
    "Subscriber",
    "ValidationDone",
    "event_from_dict",
    "event_from_json",
    "follow_events",
    "read_events",
]
