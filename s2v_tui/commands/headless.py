"""The headless face: `s2v-tui --run PRESET.toml` runs the whole job in this process, without Textual.

On a terminal it shows a rich progress bar (at most 4 refreshes a second, log lines printed above the bar);
when piped or redirected it writes plain lines, one per `logging.every_steps` steps. SIGTERM, SIGINT and SIGHUP
set the engine's stop event: the run writes a checkpoint at the next step boundary and exits, so a dropped SSH
session or a preempted machine loses at most one step. A second SIGINT aborts at once (the last checkpoint
stays).

Exit codes:
    0   the run completed and the LoRA was exported
    1   the run failed (the reason is printed as one paragraph; the traceback is in run_dir/train.log)
    2   nothing ran: the preset could not be read (the message names the file, the key and the fix), or the run
        folder refused the job (a changed config on an existing run, the folder in use or not writable)
    75  the run stopped on a signal or request after writing a checkpoint; run the same command to resume
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from typing import IO, Any

from engine.events import (CheckpointSaved, Event, LogLine, PhaseChanged, RunEnded, RunStarted, RunWarning,
                           StepEnd, TrackerStatus)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again later", which is what resuming is

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}G"


def step_line(e: StepEnd) -> str:
    grad = "-" if e.grad_norm is None else f"{e.grad_norm:.3g}"
    parts = [f"step {e.step}/{e.total_steps}", f"loss {e.loss:.4f}", f"avg {e.loss_smooth:.4f}", f"lr {e.lr:.3g}",
             f"grad {grad}", f"{e.s_per_step:.2f} s/step", f"eta {_fmt_duration(e.eta_s)}"]
    if e.peak_alloc_bytes is not None:
        parts.append(f"gpu {_fmt_gib(e.peak_alloc_bytes)}/{_fmt_gib(e.peak_reserved_bytes)}")
    if e.skipped_nonfinite:
        parts.append(f"skipped {e.skipped_nonfinite}")
    return "  ".join(parts)


def event_line(e: Event) -> str | None:
    """The one line a non-step event prints, or None for events that print nothing."""
    if isinstance(e, RunStarted):
        how = f"resuming at step {e.resumed_from_step}" if e.resumed_from_step else "new run"
        return f"run {e.name} in {e.run_dir} on {e.device} ({how}, {e.total_steps} steps)"
    if isinstance(e, PhaseChanged):
        return f"[{e.phase}] {e.detail}".rstrip()
    if isinstance(e, CheckpointSaved):
        return f"checkpoint ({e.reason}) at step {e.step}: {e.path}"
    if isinstance(e, RunWarning):
        return f"warning: {e.message}"
    if isinstance(e, LogLine):
        return f"{e.level}: {e.message}" if e.level != "info" else e.message
    if isinstance(e, TrackerStatus):
        # The routine updates (a webhook sent, an upload begun) would be a line per checkpoint; the rest matter.
        return None if e.state in ("ok", "uploading") else f"{e.tracker} {e.state}: {e.detail}".rstrip(": ")
    return None


def end_paragraph(end: RunEnded) -> str:
    if end.status == "completed":
        files = "".join(f"\n  {fmt}: {path}" for fmt, path in end.outputs.items())
        return f"done: {end.reason}.{files}"
    head = {"stopped": "stopped", "refused": "error"}.get(end.status, "failed")
    # Never break inside a word: paths and commands in the reason must stay copyable.
    return textwrap.fill(f"{head}: {end.reason}", width=100, break_long_words=False, break_on_hyphens=False)


def exit_code(end: RunEnded) -> int:
    return {"completed": EXIT_OK, "stopped": EXIT_STOPPED, "refused": EXIT_CONFIG}.get(end.status, EXIT_FAILED)


class LosableStream:
    """A stream whose reader may go away: `s2v-tui --run ... | tee log` over SSH loses tee with the session, and
    every later write raised BrokenPipeError inside the engine's event bus, whose tracebacks filled train.log.
    After the first failed write it writes nothing more (the run goes on, events.jsonl has everything), and points
    the file descriptor at /dev/null so the interpreter's last flush at exit is quiet too."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lost = False

    def _lose(self) -> None:
        self.lost = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass  # not a file with a descriptor (a test's StringIO): nothing will flush it at exit

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                return self.stream.write(text)
            except OSError:  # BrokenPipeError, EIO of a terminal that went away
                self._lose()
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self.stream.flush()
            except OSError:
                self._lose()

    def isatty(self) -> bool:
        try:
            return not self.lost and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ... of the real stream
        return getattr(self.stream, name)


class PlainReporter:
    """Piped output: one line per event that matters and one per `every` steps (and the first and last)."""

    def __init__(self, stream: IO[str], every: int = 10) -> None:
        self.stream = stream if isinstance(stream, LosableStream) else LosableStream(stream)
        self.every = max(1, every)

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepEnd):
            if event.step % self.every and event.step not in (1, event.total_steps):
                return
            line = step_line(event)
        elif isinstance(event, RunEnded):
            return  # the caller prints the closing paragraph
        else:
            line = event_line(event)
            if line is None:
                return
        self.stream.write(line + "\n")
        self.stream.flush()

    def __enter__(self) -> PlainReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class RichReporter:
    """TTY output: a progress bar for the current phase and the steps; other lines are printed above it."""

    def __init__(self, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(file=stream if isinstance(stream, LosableStream) else LosableStream(stream))
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=self.console, refresh_per_second=4, transient=False,
        )
        self.task = self.progress.add_task("starting", total=None, info="")

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepEnd):
            info = step_line(event).split("  ", 1)[1]
            self.progress.update(self.task, description=f"step {event.step}/{event.total_steps}",
                                 total=event.total_steps, completed=event.step, info=info)
            return
        if isinstance(event, PhaseChanged) and event.phase != "train":
            self.progress.update(self.task, description=event.phase, info=event.detail)
        if isinstance(event, RunEnded):
            return
        line = event_line(event)
        if line is not None:
            self.progress.console.print(line, markup=False, highlight=False)

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def make_reporter(stream: IO[str], every: int) -> PlainReporter | RichReporter:
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    return RichReporter(stream) if is_tty and os.environ.get("TERM") != "dumb" else PlainReporter(stream, every)


class StopSignals:
    """While active, SIGTERM/SIGINT/SIGHUP set `stop` instead of killing the process; a second SIGINT raises
    KeyboardInterrupt (abort without waiting for the step) until `ended` is set, after which there is nothing left
    to abort and it is ignored. Restores the previous handlers on exit."""

    def __init__(self, stop: threading.Event, notify: Callable[[str], None] | None = None) -> None:
        self.stop = stop
        self.notify = notify
        self.ended = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set() and signum == signal.SIGINT:
            if self.ended:
                return
            raise KeyboardInterrupt
        self.stop.set()
        if self.notify:
            try:
                self.notify(f"{name}: stopping at the end of this step and writing a checkpoint "
                            "(Ctrl-C again to abort at once)")
            except OSError:
                pass  # the terminal is gone (SIGHUP): the run goes on to its checkpoint regardless

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def run_headless(preset_path: str, *, overrides: Sequence[str] = (), run_dir: str | None = None,
                 stream: IO[str] | None = None, dataset=None, device: str | None = None,
                 stop_event: threading.Event | None = None) -> int:
    """Run the job of `preset_path` (with KEY=VALUE `overrides`) headless; returns the process exit code.

    `dataset`/`device` pass through to engine.runner.run (tests and the demo use an in-memory dataset)."""
    from engine.config import ConfigError, load_config, parse_override, validate_config, with_value

    out = stream or sys.stdout
    try:
        config = load_config(preset_path, require_data=dataset is None)
        for text in overrides:
            key, value = parse_override(text)
            config = with_value(config, key, value, file="--set")
        if overrides:  # the values given on the command line obey the same rules as the file, before anything runs
            validate_config(config, _override_origin(preset_path, overrides), require_data=dataset is None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run_config_headless(config, out, run_dir=run_dir, dataset=dataset, device=device, stop_event=stop_event)


def _override_origin(preset_path: str, overrides: Sequence[str]) -> Callable[[str], str]:
    """Key -> where its value came from: "--set" for the keys given there, else the preset file."""
    from engine.config import parse_override

    keys = {parse_override(text)[0] for text in overrides}
    return lambda key: "--set" if any(key == k or key.startswith(k + ".") for k in keys) else preset_path


def run_config_headless(config, stream: IO[str], *, run_dir: str | None = None, dataset=None,
                        device: str | None = None, stop_event: threading.Event | None = None,
                        extra_subscribers: Sequence[Callable[[Event], None]] = ()) -> int:
    from engine.runner import run

    stop = stop_event or threading.Event()
    stream = stream if isinstance(stream, LosableStream) else LosableStream(stream)
    reporter = make_reporter(stream, config.logging.every_steps)

    def notify(message: str) -> None:
        stream.write(message + "\n")
        stream.flush()

    signals = StopSignals(stop, notify)
    with signals:  # until the last line is printed: an impatient Ctrl-C must not end in a traceback
        with reporter:
            try:
                end = run(config, [reporter, *extra_subscribers], stop, run_dir=run_dir, dataset=dataset,
                          device=device)
            except KeyboardInterrupt:
                # The engine handles a second Ctrl-C in its phases; this one came while the run's end was being
                # written (the event log, the lock), after which the checkpoints on disk are all there is.
                end = RunEnded(status="stopped", reason="aborted by Ctrl-C while the run was ending; its "
                               "checkpoints stand: run the same command again to resume")
            signals.ended = True
        target = stream if end.status == "completed" else sys.stderr
        try:
            print(end_paragraph(end), file=target, flush=True)
        except OSError:
            pass  # no terminal left to tell; events.jsonl has the RunEnded event
    return exit_code(end)
