"""Entry points of the terminal app: `s2v-tui [CONFIG]` and `s2v-tui attach RUN_DIR`.

Both refuse to start without a terminal (a TUI in a pipe or under nohup is useless) and point at the
headless face instead. A hangup (the SSH connection drops) ends the UI cleanly; a run started from it keeps
training in this process and can be followed again with `s2v-tui attach RUN_DIR`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from engine.config import ConfigError

from s2v_tui.app import build_app
from s2v_tui.session import start_session

NO_TTY_MESSAGE = ("s2v-tui: no terminal here, so the app cannot start. For an unattended run use "
                  "`s2v-tui --run CONFIG.toml`; to watch a run, open a terminal (ssh -t) and use "
                  "`s2v-tui attach RUN_DIR`.")


def _have_tty() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _parser(prog: str, attach: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="The s2v-tui terminal app.")
    if attach:
        p.add_argument("run_dir", type=Path, help="run folder holding events.jsonl")
    else:
        p.add_argument("config", nargs="?", type=Path, help="run config TOML to open (default: base preset)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run folders (default ./runs)")
    p.add_argument("--fake", action="store_true",
                   help="try the app without a GPU or engine: fake NVML and a fake training engine")
    return p


def _detach_from_terminal() -> None:
    """After a hangup the tty is gone: point stdio at /dev/null so teardown writes fail nowhere."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        try:
            os.dup2(null, fd)
        except OSError:
            pass


def _stop_run_on_signals(app) -> None:
    """After a hangup a run started here trains on with no UI. From then on SIGTERM and SIGINT stop it at the
    next step boundary with a checkpoint, as they stop a `--run`: the default action would kill the process
    and lose every step since the last interval checkpoint."""
    worker = app.training_worker()
    stop = getattr(worker.node, "stop_event", None) if worker is not None else None
    if stop is None:
        return

    def handler(signum, frame) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _services(args: argparse.Namespace):
    from s2v_tui.services import Services, default_services, deviceless_setting_problems

    if not args.fake:
        return default_services(runs_dir=args.runs)
    from engine.gpu import GpuProbe
    from engine.gpu_fake import FakeNvml
    from s2v_tui.testing.fake_engine import FakeEngine

    return Services(probe=GpuProbe(FakeNvml()), runner=FakeEngine(step_delay_s=0.2), runs_dir=args.runs,
                    setting_problems=deviceless_setting_problems)


def _run(argv: list[str], prog: str, attach: bool) -> int:
    args = _parser(prog, attach).parse_args(argv)
    if not _have_tty():
        print(NO_TTY_MESSAGE, file=sys.stderr)
        return 2
    services = _services(args)
    try:
        session = start_session(None if attach else args.config, services.presets_dir)
    except ConfigError as exc:
        print(f"s2v-tui: {exc}", file=sys.stderr)
        return 2
    if attach:
        if not (args.run_dir / "events.jsonl").exists() and not args.run_dir.is_dir():
            print(f"s2v-tui attach: {args.run_dir} is not a run folder", file=sys.stderr)
            return 2
        session.attach_dir = args.run_dir
    app = build_app(services, session, start_mode="attach" if attach else "dataset")

    def on_hangup(signum, frame) -> None:  # main thread, between two bytecodes of the event loop
        _detach_from_terminal()
        _stop_run_on_signals(app)
        app.call_later(app.hangup)

    previous = signal.signal(signal.SIGHUP, on_hangup)
    try:
        result = app.run()
    finally:
        signal.signal(signal.SIGHUP, previous)
    return int(result or 0) if app.return_code is None else app.return_code


def main_tui(argv: list[str]) -> int:
    """`s2v-tui [CONFIG] [--runs DIR] [--fake]`: the app, starting on the Dataset screen."""
    return _run(argv, "s2v-tui", attach=False)


def main_attach(argv: list[str]) -> int:
    """`s2v-tui attach RUN_DIR [--runs DIR]`: the app, following RUN_DIR from the first screen."""
    return _run(argv, "s2v-tui attach", attach=True)


if __name__ == "__main__":
    sys.exit(main_tui(sys.argv[1:]))
