"""The run-folder lock: a second live process is refused by name, a killed owner's lock is taken over, a
filesystem without locks is refused loudly. Owners are real child processes."""
from __future__ import annotations

import errno
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pytest

from engine.train import run_lock
from engine.train.run_lock import LOCK_FILENAME, RunFolderBusy, RunLockUnsupported, acquire_run_lock

REPO = Path(__file__).resolve().parents[1]

# Takes the lock, says so, and holds it until its stdin closes (or it is killed).
_OWNER = textwrap.dedent("""
    import sys
    from engine.train.run_lock import acquire_run_lock
    lock = acquire_run_lock(sys.argv[1], what="train")
    print("locked", flush=True)
    sys.stdin.read()
    lock.release()
""")


def _start_owner(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _OWNER, str(run_dir)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline().strip() == "locked"
    return child


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.stdin.close()
        child.wait(timeout=30)


def test_a_second_process_is_refused_by_name_until_the_first_ends(tmp_path):
    child = _start_owner(tmp_path)
    try:
        with pytest.raises(RunFolderBusy) as caught:
            acquire_run_lock(tmp_path)
        message = str(caught.value)
        assert isinstance(caught.value, RuntimeError)
        assert str(tmp_path) in message
        assert f"process {child.pid} on {platform.node()}" in message
        assert "(train)" in message and "-c" in message  # what and the command line
        assert f"kill -TERM {child.pid} writes a checkpoint" in message
        assert "output.name / --run-dir" in message and "\n" not in message
        assert caught.value.owner["pid"] == child.pid
    finally:
        _stop(child)
    assert child.returncode == 0
    with acquire_run_lock(tmp_path) as lock:
        assert lock.held


def test_a_killed_owners_lock_is_taken_over_and_the_recovery_logged(tmp_path, caplog):
    child = _start_owner(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert json.loads((tmp_path / LOCK_FILENAME).read_text())["pid"] == child.pid  # the dead owner's note stays
    with caplog.at_level(logging.INFO, logger=run_lock.__name__):
        lock = acquire_run_lock(tmp_path)
    try:
        assert f"recovered the lock of {tmp_path} (process {child.pid} no longer runs)" in caplog.text
        assert json.loads((tmp_path / LOCK_FILENAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_the_lock_file_names_its_owner(tmp_path):
    before = datetime.now().astimezone().replace(microsecond=0)
    with acquire_run_lock(tmp_path / "new" / "run", what="export") as lock:
        note = json.loads((tmp_path / "new" / "run" / LOCK_FILENAME).read_text())
        assert note == lock.owner
    assert note["pid"] == os.getpid()
    assert note["hostname"] == platform.node()
    assert note["command"] == shlex.join(sys.argv)
    assert note["what"] == "export"
    started = datetime.fromisoformat(note["started"])
    assert started.tzinfo is not None and before <= started <= datetime.now().astimezone()


def test_release_is_idempotent_and_a_clean_release_is_not_a_recovery(tmp_path, caplog):
    lock = acquire_run_lock(tmp_path)
    with pytest.raises(RunFolderBusy):  # the same process asking again is a second owner too
        acquire_run_lock(tmp_path)
    lock.release()
    lock.release()
    assert not lock.held
    assert (tmp_path / LOCK_FILENAME).read_bytes() == b""
    with caplog.at_level(logging.INFO, logger=run_lock.__name__):
        again = acquire_run_lock(tmp_path)
    again.release()
    assert "recovered" not in caplog.text


def test_an_unreadable_owner_note_still_refuses(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "_OWNER_READ_PAUSE_S", 0.001)
    child = _start_owner(tmp_path)
    try:
        (tmp_path / LOCK_FILENAME).write_bytes(b"{torn")  # flock is advisory: the note can be overwritten
        with pytest.raises(RunFolderBusy) as caught:
            acquire_run_lock(tmp_path)
        assert "cannot be read" in str(caught.value) and str(tmp_path) in str(caught.value)
        assert caught.value.owner is None
    finally:
        _stop(child)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_without_locks_is_refused_loudly(tmp_path, monkeypatch, code):
    def no_locks(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with pytest.raises(RunLockUnsupported) as caught:
        acquire_run_lock(tmp_path)
    assert str(tmp_path) in str(caught.value) and "does not support file locks" in str(caught.value)


def test_a_forked_child_releasing_its_copy_keeps_the_parents_lock(tmp_path):
    lock = acquire_run_lock(tmp_path)
    try:
        pid = os.fork()
        if pid == 0:  # the child, e.g. a data loader worker that cleans up on exit
            lock.release()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        probe = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom engine.train.run_lock import acquire_run_lock\n"
             "acquire_run_lock(sys.argv[1])", str(tmp_path)],
            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "RunFolderBusy" in probe.stderr and str(os.getpid()) in probe.stderr
    finally:
        lock.release()


def test_a_note_that_cannot_be_written_keeps_the_lock(tmp_path, monkeypatch, caplog):
    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_lock.os, "pwrite", disk_full)
    with caplog.at_level(logging.WARNING, logger=run_lock.__name__):
        lock = acquire_run_lock(tmp_path)
    monkeypatch.undo()
    try:
        assert "No space left on device" in caplog.text
        with pytest.raises(RunFolderBusy, match="cannot be read"):
            acquire_run_lock(tmp_path)
    finally:
        lock.release()
