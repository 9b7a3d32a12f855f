"""The installed `s2v-tui` in a real terminal (tmux at 80x24): launch, go to Run, train the tiny model on the
CPU with the real engine, watch the step counter move, stop with a checkpoint, quit. Skipped without tmux."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from s2v_tui.testing import TINY_RUN_STEPS, write_tiny_run_preset
from s2v_tui.tmux_driver import TmuxApp, tmux_path

STEP = re.compile(rf"step (\d+)/{TINY_RUN_STEPS}")


def installed_app() -> str | None:
    """The console script of this environment (what users run), else one on PATH."""
    beside = Path(sys.executable).parent / "s2v-tui"
    return str(beside) if beside.exists() else shutil.which("s2v-tui")


pytestmark = [
    pytest.mark.skipif(tmux_path() is None, reason="tmux is not installed (apt-get install -y tmux) so there is "
                       "no real terminal to drive"),
    pytest.mark.skipif(installed_app() is None, reason="the s2v-tui command is not installed (pip install -e .)"),
]


def step_at_least(n: int):
    def test(screen: str) -> int | None:
        found = STEP.search(screen)
        return int(found.group(1)) if found and int(found.group(1)) >= n else None
    return test


def test_launch_train_stop_quit_in_tmux(tmp_path):
    preset = write_tiny_run_preset(tmp_path)
    runs = tmp_path / "runs"
    with TmuxApp([installed_app(), str(preset), "--runs", str(runs)], tmp_path, width=80, height=24) as term:
        term.wait_for("1 Dataset", 30, "the first screen")
        term.send("4")
        term.wait_for("press s to start", 10, "the Run screen")
        term.send("s")
        first = term.wait_for(step_at_least(3), 60, "three training steps on the Run screen")
        later = term.wait_for(step_at_least(first + 5), 30, "the step counter advancing")
        term.send("x")
        term.wait_for("Stop training?", 10, "the stop question")
        term.send("BTab")  # focus moves from "Keep training" (the safe default) to "Checkpoint and stop"
        term.send("Enter")
        term.wait_for("run stopped", 30, "the run to stop")
        stopped_at = int(term.wait_for(r"stopped at step (\d+)", 5, "the stop step").group(1))
        term.send("C-q")
        assert term.wait_exit(15) == 0
    checkpoints = sorted((runs / "tui-tiny" / "checkpoints").glob("step-*"))
    assert checkpoints, "the stop wrote no checkpoint"
    assert checkpoints[-1].name.startswith(f"step-{stopped_at:08d}") and stopped_at >= later
