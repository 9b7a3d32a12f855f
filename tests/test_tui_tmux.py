"""The installed `s2v-tui` in a real terminal (tmux at 80x24): launch, go to Run, train the tiny model on the
CPU with the real engine, watch the step counter move, stop with a checkpoint, quit. Skipped without tmux."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s2v_tui.testing.fakes import TINY_RUN_STEPS, write_tiny_run_preset
from s2v_tui.testing.tmux_driver import TmuxApp, tmux_path

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


def app_pid(run_dir: Path) -> int:
    """The pid of the process training in `run_dir`, from the run's own run_started event."""
    return json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])["pid"]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except OSError:
        return True


def wait_until(condition, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.1)


def step_count(run_dir: Path) -> int:
    return (run_dir / "events.jsonl").read_text().count('"kind":"step_end"')


def test_pane_killed_while_training_the_run_goes_on_headless(tmp_path):
    """The terminal goes away mid-run: the UI ends, training continues in the same process, and SIGTERM then
    stops it with a checkpoint, as it stops a `--run`."""
    preset = write_tiny_run_preset(tmp_path)
    run_dir = tmp_path / "runs" / "tui-tiny"
    with TmuxApp([installed_app(), str(preset), "--runs", str(run_dir.parent)], tmp_path) as term:
        term.wait_for("1 Dataset", 30, "the first screen")
        term.send("4")
        term.wait_for("press s to start", 10, "the Run screen")
        term.send("s")
        term.wait_for(step_at_least(3), 60, "training")
        pid = app_pid(run_dir)
        term.tmux("kill-pane", "-t", "app")
    before = step_count(run_dir)
    wait_until(lambda: step_count(run_dir) >= before + 10, 30, "steps after the terminal went away")
    assert not gone(pid)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: gone(pid), 30, "the process to exit after SIGTERM")
    last = json.loads((run_dir / "events.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "run_ended" and last["status"] == "stopped", last
    assert list((run_dir / "checkpoints").glob("step-*"))


def test_pane_killed_while_attached_to_a_headless_run(tmp_path):
    """`s2v-tui attach` follows a `--run` of another process; killing its pane ends it cleanly and the run
    does not notice."""
    preset = write_tiny_run_preset(tmp_path)
    run_dir = tmp_path / "runs" / "tui-tiny"
    with open(tmp_path / "headless.out", "w") as out:
        headless = subprocess.Popen([installed_app(), "--run", str(preset)], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_until(lambda: (run_dir / "events.jsonl").exists() and step_count(run_dir) >= 3, 60, "headless steps")
        with TmuxApp([installed_app(), "attach", str(run_dir), "--runs", str(run_dir.parent)], tmp_path) as term:
            term.wait_for(STEP.pattern, 30, "the attached run's steps")
            shell = term.pane_pid()
            attach = int(subprocess.run(["pgrep", "-P", str(shell)], capture_output=True, text=True).stdout.split()[0])
            term.tmux("kill-pane", "-t", "app")
            wait_until(lambda: gone(attach), 15, "the attached app to exit")
        before = step_count(run_dir)
        wait_until(lambda: step_count(run_dir) > before + 5, 30, "the headless run to go on")
        assert headless.poll() is None
        headless.send_signal(signal.SIGTERM)
        assert headless.wait(timeout=30) == 75  # stopped with a checkpoint; run again to resume
    finally:
        if headless.poll() is None:
            headless.kill()
            headless.wait()


def colour_codes(styled: str) -> list[str]:
    """The foreground/background colours set by the SGR escapes of a `capture-pane -e` dump."""
    codes = []
    for params in re.findall(r"\x1b\[([0-9;]*)m", styled):
        parts = params.split(";")
        i = 0
        while i < len(parts):
            if parts[i] in ("38", "48") and i + 1 < len(parts):
                width = 3 if parts[i + 1] == "5" else 5
                codes.append(";".join(parts[i:i + width]))
                i += width
                continue
            if parts[i].isdigit() and (30 <= int(parts[i]) <= 37 or 40 <= int(parts[i]) <= 47
                                       or 90 <= int(parts[i]) <= 107):
                codes.append(parts[i])
            i += 1
    return codes


def grey(code: str) -> bool:
    parts = code.split(";")
    if len(parts) == 3:  # 256 colours: 16 and 231 are black and white, 232-255 the grey ramp
        return int(parts[2]) in (0, 7, 15, 16, 231) or int(parts[2]) >= 232
    if len(parts) == 5:
        return len(set(parts[2:])) == 1
    return code in ("30", "37", "40", "47", "90", "97", "100", "107")


def test_no_color_and_idle_screen_is_quiet(tmp_path):
    """NO_COLOR: Textual's monochrome rendering, so no hue reaches the terminal (greys keep the cursor and the
    focus visible). No animation: an idle app writes (almost) nothing."""
    preset = write_tiny_run_preset(tmp_path)
    with TmuxApp([installed_app(), str(preset), "--runs", str(tmp_path / "runs")], tmp_path,
                 env={"NO_COLOR": "1"}) as term:
        term.wait_for("1 Dataset", 30, "the first screen")
        term.send("4")
        term.wait_for("press s to start", 10, "the Run screen")
        styled = term.tmux("capture-pane", "-p", "-e", "-t", "app").stdout
        hues = [code for code in colour_codes(styled) if not grey(code)]
        assert not hues, f"colours with NO_COLOR set: {hues[:5]}"
        time.sleep(1.5)  # let the first readings paint
        written = tmp_path / "pane.out"
        term.tmux("pipe-pane", "-o", "-t", "app", f"cat > {written}")
        time.sleep(3)
        term.tmux("pipe-pane", "-t", "app")
        term.send("C-q")
        assert term.wait_exit(15) == 0
    # 1 Hz host-RAM readings may repaint a number; a blinking cursor or an animation would write far more.
    assert written.stat().st_size < 2000, written.read_bytes()[:400]


def test_a_new_user_goes_from_an_empty_folder_to_a_running_training_without_editing_a_file(tmp_path):
    """What a newcomer does over SSH at 80x24: open the app in an empty folder, press n (the first screen says
    so), make the tiny demo model and clips, use them, check the clips (64x64 with a 64x64 fixed bucket: not
    blocked, as `s2v-tui check` agrees), train. No file is written by hand and no screen key misfires."""
    steps = re.compile(r"step (\d+)/120")
    with TmuxApp([installed_app()], tmp_path, width=80, height=24, env={"OMP_NUM_THREADS": "1"}) as term:
        term.wait_for("press n for a new run", 30, "the first screen's hint")
        term.send("n")
        term.wait_for("Tiny demo makes", 10, "the New run dialog")
        term.send("Tab", "Tab", "Tab")  # model, dataset, name: then the Tiny demo button
        term.send("Enter")
        term.wait_for("Tiny demo ready", 60, "the tiny model and clips")
        term.send("Enter")  # Use has the focus now
        term.wait_for("Run demo-lora set up", 10, "the config to take the demo")
        term.send("C-r")
        term.wait_for("2 clips, 2 usable, 4 windows/epoch; 0 blocking", 60, "a passing dataset check")
        term.send("C-t")
        term.wait_for("training in runs/demo-lora", 10, "the Run screen")
        first = term.wait_for(lambda s: (m := steps.search(s)) and int(m.group(1)) >= 3 and int(m.group(1)), 90,
                              "three training steps")
        term.send("x")
        term.wait_for("Stop training?", 10, "the stop question")
        term.send("BTab")
        term.send("Enter")
        term.wait_for("run stopped|run completed", 60, "the run to stop")
        term.send("C-q")
        assert term.wait_exit(15) == 0
    run_dir = tmp_path / "runs" / "demo-lora"
    assert (tmp_path / "s2v-demo" / "model" / "transformer").is_dir() and first >= 3
    assert list((run_dir / "checkpoints").glob("step-*")), "the stop wrote no checkpoint"
    assert not list(tmp_path.glob("*.toml"))  # nothing to edit, nothing written by hand
