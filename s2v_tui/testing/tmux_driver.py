"""Drive the installed `s2v-tui` in a real terminal: a private tmux server, keys in, the pane's text out.

Used by the end-to-end terminal test and by bench/tui_overhead.py. Each driver starts its own tmux server
(`-L` socket name, `-f /dev/null` so nobody's tmux.conf changes the terminal), so it never touches a user's
sessions. The app's exit status is written to a file by the shell that runs it: the file appearing is how we
know the app has exited, and its content is the exit code.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def tmux_path() -> str | None:
    return shutil.which("tmux")


class TmuxTimeout(AssertionError):
    """What we waited for did not show; the message holds the last screen, which is what one needs to see."""


class TmuxApp:
    def __init__(self, command: Sequence[str], workdir: Path, *, width: int = 80, height: int = 24,
                 env: Mapping[str, str] | None = None) -> None:
        self.command = list(command)
        self.workdir = Path(workdir)
        self.width, self.height = width, height
        self.env = dict(env or {})
        self.socket = f"s2v-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.exit_file = self.workdir / f".tmux-exit-{self.socket}"

    # -- tmux plumbing ---------------------------------------------------------------------------------------

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, "-f", os.devnull, *args], capture_output=True,
                              text=True, check=check, timeout=10)

    def start(self) -> TmuxApp:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        app = " ".join(shlex.quote(part) for part in self.command)
        # `exec env` is not used: the shell must outlive the app to write its exit status.
        script = f"cd {shlex.quote(str(self.workdir))} && {('env ' + exports + ' ') if exports else ''}{app}; " \
                 f"echo $? > {shlex.quote(str(self.exit_file))}"
        self.tmux("new-session", "-d", "-s", "app", "-x", str(self.width), "-y", str(self.height), "sh", "-c", script)
        return self

    def close(self) -> None:
        self.tmux("kill-server", check=False)

    def __enter__(self) -> TmuxApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the tests use ----------------------------------------------------------------------------------

    def screen(self) -> str:
        done = self.tmux("capture-pane", "-p", "-t", "app", check=False)
        return done.stdout if done.returncode == 0 else ""

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "app", *keys)

    def pane_pid(self) -> int:
        return int(self.tmux("display-message", "-p", "-t", "app", "#{pane_pid}").stdout.strip())

    def wait_for(self, pattern: str | Callable[[str], object], timeout_s: float, what: str = "",
                 poll_s: float = 0.05) -> object:
        """Poll the pane until `pattern` (a regex, or a function of the screen text) matches; returns the match."""
        test = (lambda text: re.search(pattern, text)) if isinstance(pattern, str) else pattern
        end = time.monotonic() + timeout_s
        text = ""
        while True:
            text = self.screen()
            found = test(text)
            if found:
                return found
            if self.exited() is not None and not text:
                raise TmuxTimeout(f"the app exited ({self.exited()}) while waiting for {what or pattern}")
            if time.monotonic() > end:
                raise TmuxTimeout(f"no {what or pattern} after {timeout_s:.0f} s; the screen was:\n{text}")
            time.sleep(poll_s)

    def exited(self) -> int | None:
        """The app's exit status once it has exited, else None."""
        try:
            text = self.exit_file.read_text().strip()
        except OSError:
            return None
        return int(text) if text else None

    def wait_exit(self, timeout_s: float) -> int:
        end = time.monotonic() + timeout_s
        while (code := self.exited()) is None:
            if time.monotonic() > end:
                raise TmuxTimeout(f"the app did not exit in {timeout_s:.0f} s; the screen was:\n{self.screen()}")
            time.sleep(0.05)
        return code
