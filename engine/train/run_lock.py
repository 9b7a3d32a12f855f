"""One process per run folder: an exclusive `flock` on `run_dir/.run.lock` that names its owner.

Two trainers in one folder would train the same steps, interleave `events.jsonl`, and the second one's
stale-temp cleanup would delete the first one's checkpoint being written. The runner therefore takes this lock
before it touches anything in the folder and holds it until the run has ended:

    with acquire_run_lock(run_dir, what="train") as lock:   # raises RunFolderBusy when the folder is taken
        ...                                                  # everything that reads or writes run_dir

or `lock = acquire_run_lock(run_dir)` ... `lock.release()` (releasing twice is harmless).

Why flock and not "a pid file": the kernel drops the lock when its owner's last descriptor closes, which includes
the owner crashing or being killed with SIGKILL. A stale lock therefore never blocks the next start; there is no
pid guessing, and a reused pid cannot keep a folder locked. The JSON in the file (pid, host, start time,
command line, `what`) is only for people: it names the owner in the refusal, and a next owner that finds it
from a process that no longer runs logs that it recovered the lock.

The lock belongs to the open file, so it is shared by forked children (e.g. data loader workers) and held until
the last of them exits; `release()` in a forked child only closes the child's copy. A second
`acquire_run_lock` of the same folder in the same process is refused like any other process. Filesystems
without flock (some network mounts) raise `RunLockUnsupported` rather than running unprotected.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILENAME = ".run.lock"

# Errors with which a filesystem says it cannot lock at all, as opposed to "someone else holds it".
_NO_LOCK_SUPPORT = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})
# The owner writes its note just after taking the lock; a refusal in that instant waits this long to read it.
_OWNER_READ_TRIES = 10
_OWNER_READ_PAUSE_S = 0.05


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder. `owner` is its note (None when unreadable)."""

    def __init__(self, run_dir: Path, owner: dict[str, Any] | None, unreadable: str = "") -> None:
        self.run_dir = run_dir
        self.owner = owner
        super().__init__(_busy_message(run_dir, owner, unreadable))


class RunLockUnsupported(RuntimeError):
    """The run folder's filesystem cannot lock files, so one owner per folder cannot be guaranteed."""


def _owner_note(what: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "hostname": platform.node(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "what": what,
    }


def _parse_note(raw: bytes) -> dict[str, Any]:
    note = json.loads(raw.decode("utf-8"))
    if not isinstance(note, dict) or not isinstance(note.get("pid"), int):
        raise ValueError("no owner pid in it")
    return note


def _read_note(fd: int) -> tuple[dict[str, Any] | None, str]:
    """The note in the lock file, or (None, why not). Retried briefly: the owner may be writing it right now."""
    why = ""
    for attempt in range(_OWNER_READ_TRIES):
        try:
            raw = os.pread(fd, 64 * 1024, 0)
        except OSError as exc:
            return None, os.strerror(exc.errno) if exc.errno else str(exc)
        try:
            return _parse_note(raw), ""
        except (ValueError, UnicodeDecodeError) as exc:
            why = "it is empty" if not raw.strip() else f"it is not an owner note ({exc})"
        if attempt + 1 < _OWNER_READ_TRIES:
            time.sleep(_OWNER_READ_PAUSE_S)
    return None, why


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _busy_message(run_dir: Path, owner: dict[str, Any] | None, unreadable: str) -> str:
    fix_pid = "PID"
    if owner is None:
        who = (f"another process holds its lock, but the owner note in {run_dir / LOCK_FILENAME} cannot be read "
               f"({unreadable}; `fuser -v {run_dir / LOCK_FILENAME}` names the process)")
    else:
        pid, host = owner.get("pid"), owner.get("hostname") or "an unknown host"
        fix_pid = str(pid)
        since = owner.get("started") or "an unknown time"
        command = owner.get("command") or "an unknown command"
        doing = f" ({owner['what']})" if owner.get("what") else ""
        who = f"process {pid} on {host}{doing} has been using it since {since}, started as `{command}`"
        if host != platform.node():
            fix_pid = f"{pid} on {host}"
    return (f"The run folder {run_dir} is in use: {who}. Two processes in one run folder would train the same "
            f"steps and overwrite each other's checkpoints, so this one does not start. Wait for it to finish, "
            f"stop it (kill -TERM {fix_pid} writes a checkpoint), or choose another output.name / --run-dir.")


def _note_recovery(run_dir: Path, previous: dict[str, Any] | None) -> None:
    # An owner that released cleanly emptied the note; one that is still there belongs to an owner that died.
    if previous is None or previous.get("pid") == os.getpid():
        return
    pid, host = previous["pid"], previous.get("hostname")
    if host == platform.node():
        if not _pid_runs(pid):
            log.info("recovered the lock of %s (process %d no longer runs)", run_dir, pid)
    else:
        log.info("recovered the lock of %s (last held by process %d on %s, which let it go)", run_dir, pid, host)


class RunLock:
    """The held lock of one run folder; `release()` (or leaving the `with` block) lets it go."""

    def __init__(self, run_dir: Path, fd: int, owner: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILENAME
        self.owner = owner
        self._fd: int | None = fd
        self._owner_pid = os.getpid()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # A forked child shares the parent's lock: unlocking here would unlock the parent too.
            if os.getpid() == self._owner_pid:
                try:
                    os.ftruncate(fd, 0)  # an empty note tells the next owner this one left cleanly
                except OSError:
                    pass
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.run_dir)!r}, held={self.held})"


def _write_note(fd: int, path: Path, note: dict[str, Any]) -> None:
    data = (json.dumps(note, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    try:
        os.ftruncate(fd, 0)
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        os.fsync(fd)
    except OSError as exc:
        # The lock itself holds; only the note naming us is missing, and a refused second start says so.
        log.warning("holding the lock of %s but could not write who holds it to %s: %s", path.parent, path,
                    os.strerror(exc.errno) if exc.errno else exc)


def acquire_run_lock(run_dir: str | os.PathLike[str], what: str = "") -> RunLock:
    """Take the run folder's lock for this process, or raise `RunFolderBusy` naming the process that has it.

    `what` says what this process does there (e.g. "train", "export"); it appears in a refusal. Creates
    `run_dir` if needed. Raises `RunLockUnsupported` when the filesystem cannot lock files.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILENAME
    # O_CLOEXEC: a program this process execs must not inherit (and so prolong) the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner, why = _read_note(fd)
            raise RunFolderBusy(run_dir, owner, why) from None
        except OSError as exc:
            if exc.errno in _NO_LOCK_SUPPORT:
                raise RunLockUnsupported(
                    f"The run folder {run_dir} is on a filesystem that does not support file locks "
                    f"({os.strerror(exc.errno)}), so nothing would stop a second process from training in it "
                    f"at the same time. Put the run folder on a local disk (output.run_dir or --run-dir)."
                ) from exc
            raise
        try:
            previous = _parse_note(os.pread(fd, 64 * 1024, 0))
        except (OSError, ValueError, UnicodeDecodeError):
            previous = None
        _note_recovery(run_dir, previous)
        note = _owner_note(what)
        _write_note(fd, path, note)
    except BaseException:
        os.close(fd)  # also drops the lock if we got it
        raise
    return RunLock(run_dir, fd, note)


__all__ = ["LOCK_FILENAME", "RunFolderBusy", "RunLock", "RunLockUnsupported", "acquire_run_lock"]
