"""The app in a real pseudo-terminal: it draws, and a hangup (SIGHUP, the SSH connection gone) ends it
cleanly while a run started elsewhere keeps going."""
from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_tui_attach import start_writer  # tests/ is on sys.path under pytest

REPO = Path(__file__).resolve().parents[1]
APP = "import sys; from s2v_tui.commands.tui import main_attach; sys.exit(main_attach(sys.argv[1:]))"


def read_until(fd: int, needle: bytes, timeout_s: float) -> bytes:
    seen = b""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and needle not in seen:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


def test_hangup_exits_cleanly_and_the_run_goes_on(tmp_path):
    run_dir = tmp_path / "runs" / "remote"
    writer = start_writer(run_dir, steps=400, delay=0.02)
    primary, secondary = pty.openpty()
    env = dict(os.environ, COLUMNS="80", LINES="24")
    app = subprocess.Popen([sys.executable, "-c", APP, str(run_dir), "--fake", "--runs", str(tmp_path / "runs")],
                           stdin=secondary, stdout=secondary, stderr=secondary, cwd=REPO, env=env,
                           start_new_session=True)
    os.close(secondary)
    try:
        assert b"Runs" in read_until(primary, b"Runs", 30), "the app did not draw"
        app.send_signal(signal.SIGHUP)
        assert app.wait(timeout=20) == 0
        assert writer.poll() is None, "the hangup of a watcher must not touch the run"
    finally:
        os.close(primary)
        for proc in (app, writer):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
