"""events.jsonl: the run's event log, written so that a failing disk never detaches it, read and followed.

Every event is also appended here (engine.runner subscribes the writer), so any process can follow a run it did not
start: `s2v-tui attach` and the app tail it with `follow_events`. One event is one strict JSON line.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.events import (
    EVENTS_FILENAME,
    CheckpointSaved,
    Event,
    RunEnded,
    RunWarning,
    event_from_json,
)

log = logging.getLogger("engine.events")


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
