"""Work that talks to the outside world (wandb, webhooks, the Hub) runs here, off the training thread.

A service that is slow, down or unreachable must never cost a training step: the subscribers only queue a job
and return. `BackgroundWorker` runs the jobs of one service in order on one daemon thread; `with_retries` is the
one retry policy they share (a few attempts, doubling waits, cut short by a cancel event).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_CLOSE = object()  # the job that tells the thread to end


class BackgroundWorker:
    """Runs submitted callables in order on one daemon thread.

    At most `max_pending` jobs wait: `submit` returns False instead of queueing more (the caller says what was
    dropped), so a dead service cannot make the queue grow for the whole night. A job that raises is logged and
    the next one runs. `wait` lets the queue empty, up to a deadline; jobs still waiting then are
    discarded (the thread is a daemon, so it never keeps the process alive).
    """

    def __init__(self, name: str, max_pending: int = 1000) -> None:
        self.name = name
        self.max_pending = max_pending
        self.cancelled = threading.Event()  # set when `wait` gives up: retries and waits end early
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"s2v-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], object]) -> bool:
        if self._closed or self._queue.qsize() >= self.max_pending:
            return False
        self._queue.put(job)
        return True

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _CLOSE:
                return
            if self.cancelled.is_set():
                continue  # `wait` gave up on the jobs still waiting
            try:
                job()
            except Exception:
                log.exception("%s: a background job failed", self.name)

    def finish(self) -> None:
        """Take no more jobs; the thread ends once the queued ones have run."""
        if not self._closed:
            self._closed = True
            self._queue.put(_CLOSE)

    def wait(self, timeout_s: float, stop: threading.Event | None = None) -> int:
        """Wait for the queued jobs for at most `timeout_s` (less if `stop` is set meanwhile); returns how many
        were left undone (0: everything ran). Those are given up: the running one's retries end early."""
        self.finish()
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive():
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                break
            self._thread.join(min(left, 0.1))
        if not self._thread.is_alive():
            return 0
        undone = self._queue.qsize()  # the close marker is among them; the running job counts instead
        self.cancelled.set()
        return max(1, undone)

def with_retries(fn: Callable[[], T], attempts: int, first_wait_s: float, *,
                 cancelled: threading.Event | None = None,
                 retry_if: Callable[[Exception], bool] = lambda exc: True, what: str = "request") -> T:
    """`fn()`, tried up to `attempts` times with waits of first_wait_s, 2x, 4x ... between tries, while
    `retry_if(error)` says another try may succeed; the last error is raised. A set `cancelled` event ends the
    waiting (and the retries) at once."""
    wait = first_wait_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not retry_if(exc) or (cancelled is not None and cancelled.is_set()):
                raise
            log.debug("%s failed (try %d of %d): %s; again in %.1f s", what, attempt, attempts, exc, wait)
            if cancelled is not None:
                if cancelled.wait(wait):
                    raise
            else:
                time.sleep(wait)
            wait *= 2
    raise ValueError(f"attempts must be at least 1, got {attempts}")
