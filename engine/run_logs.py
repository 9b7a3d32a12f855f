"""train.log's plumbing: a handler that survives a failing disk, and records held until the file is open.

Both serve engine.runner: the run's log must never be what ends a run in a traceback, and what is logged while
the run folder is being opened (before train.log exists) must still reach it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

log = logging.getLogger("engine.runner")


class TrainLogHandler(logging.FileHandler):
    """train.log. A full or read-only disk must neither print logging's "--- Logging error ---" traceback for
    every record nor make the run's end raise from close(): lines that cannot be written wait in the file's
    buffer or are lost, and the first failure of each episode is said once, as a warning the faces show."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8")
        self.failing = False
        self._failed = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)  # a failure ends in handleError
        if not self._failed:
            self.failing = False

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed = True
        if self.failing:
            return
        self.failing = True  # before logging: the warning below comes back here and must stay quiet
        exc = sys.exc_info()[1]
        cause = (exc.strerror or str(exc)) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        log.warning("cannot write %s (%s): its lines are lost while this lasts; events.jsonl has the events",
                    self.baseFilename, cause)

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            pass  # the lines a full disk kept out are lost; io closes the descriptor after the failed flush


class HeldRecords(logging.Handler):
    """The records a logger writes while the run folder is being opened, before train.log is: taking the lock
    says whether it recovered it from a process that died (a kill -9, the kernel's OOM killer), which the user
    should read in train.log and the face."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextlib.contextmanager
    def capturing(self, name: str):
        logger = logging.getLogger(name)
        level, propagate = logger.level, logger.propagate
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # told once, when replayed through the run's handlers
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate
