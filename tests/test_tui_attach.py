"""Attach follows a run written by another process, and detaching never touches that process."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.event_log import read_events
from engine.events import RunEnded
from s2v_tui.app import build_app
from s2v_tui.session import start_session
from s2v_tui.testing.fakes import fake_services

pytestmark = pytest.mark.anyio

WRITER = textwrap.dedent("""
    import sys, threading
    from engine.config import Config
    from s2v_tui.testing.fake_engine import FakeEngine
    FakeEngine(steps=int(sys.argv[2]), step_delay_s=float(sys.argv[3]))(Config(), [], threading.Event(),
                                                                         run_dir=sys.argv[1])
""")


@pytest.fixture
def anyio_backend():
    return "asyncio"


def start_writer(run_dir: Path, steps: int, delay: float) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), str(steps), str(delay)], cwd=repo)


async def wait_for(pilot, predicate, timeout_s: float = 20.0) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return True
        await pilot.pause(0.05)
    return predicate()


async def test_attach_follows_other_process_and_detach_leaves_it_running(tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "remote"
    writer = start_writer(run_dir, steps=60, delay=0.05)
    try:
        session = start_session(None, tmp_path / "no-presets")
        session.attach_dir = run_dir
        app = build_app(fake_services(tmp_path, runs_dir=runs), session, start_mode="attach")
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.screen
            assert await wait_for(pilot, lambda: screen.model.snapshot().step >= 5)
            snap = screen.model.snapshot()
            assert snap.status == "running" and snap.total_steps == 60
            await pilot.press("ctrl+d")  # detach
            await pilot.pause()
            assert screen.following is None
            assert writer.poll() is None, "detaching must not stop the run"
            assert writer.wait(timeout=60) == 0
            assert isinstance(read_events(run_dir / "events.jsonl")[-1], RunEnded)
            # Pick it again from the list: the whole log is replayed, ending where the run ended.
            await pilot.press("ctrl+r")
            await pilot.pause()
            table = screen.query_one("#runs")
            assert table.row_count == 1 and str(table.get_row_at(0)[1]) == "completed"
            table.focus()
            await pilot.press("enter")
            assert await wait_for(pilot, lambda: screen.model.snapshot().status == "completed")
            assert screen.model.snapshot().step == 60
            assert len(screen.model.snapshot().losses) == 60
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
