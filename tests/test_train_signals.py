"""Runs in a child process, killed for real: SIGKILL then resume; SIGTERM to a headless run."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from engine.config import save_config, with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from engine.runner import run
from engine.models.lora import load_lora
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import demo_config
from s2v_tui.commands.headless import EXIT_OK, EXIT_STOPPED

ROOT = Path(__file__).resolve().parents[1]

# The child: the demo's settings with a step count and checkpoint interval; prints each step; sleeps a little per
# step so the parent can kill it in the middle of the run.
ENGINE_CHILD = r"""
import sys, time
from pathlib import Path
from engine.config import with_value
from engine.runner import run
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import demo_config

model_dir, runs, run_dir, steps, every = sys.argv[1:6]
config = demo_config(Path(model_dir), Path(runs))
config = with_value(with_value(config, "optim.max_steps", int(steps)), "checkpoint.every_steps", int(every))

def tell(event):
    if event.kind == "step_end":
        print(f"STEP {event.step}", flush=True)
        time.sleep(0.05)

end = run(config, [tell], None, run_dir=run_dir, dataset=SyntheticLatentDataset(2), device="cpu")
sys.exit(0 if end.status == "completed" else 1)
"""

HEADLESS_CHILD = r"""
import sys
import torch
torch.set_num_threads(1)
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.headless import run_headless
sys.exit(run_headless(sys.argv[1], run_dir=sys.argv[2], dataset=SyntheticLatentDataset(2), device="cpu"))
"""


def _child(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen, predicate, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if predicate(line):
            return line
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"child never printed the line; stdout:\n{''.join(lines)}\nstderr:\n{proc.stderr.read()}")


def _step_losses(run_dir: Path) -> dict[int, float]:
    return {e.step: e.loss for e in read_events(run_dir / EVENTS_FILENAME) if e.kind == "step_end"}


def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    steps, every = 14, 4
    kill_at = random.Random().randint(2, steps - 2)
    config = demo_config(tiny_model_dir, tmp_path / "runs")
    config = with_value(with_value(config, "optim.max_steps", steps), "checkpoint.every_steps", every)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child: the same thread count gives the same float sums
    try:
        reference = run(config, [], threading.Event(), run_dir=tmp_path / "ref", dataset=SyntheticLatentDataset(2),
                        device="cpu")
    finally:
        torch.set_num_threads(before)
    assert reference.status == "completed"

    run_dir = tmp_path / "killed"
    args = (tiny_model_dir, tmp_path / "runs", run_dir, steps, every)
    proc = _child(ENGINE_CHILD, *args)
    _wait_for_line(proc, lambda line: line.strip() == f"STEP {kill_at}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_events = read_events(run_dir / EVENTS_FILENAME)
    assert not any(e.kind == "run_ended" for e in killed_events), f"killed at step {kill_at} too late"
    newest = max((e.step for e in killed_events if e.kind == "checkpoint_saved"), default=0)

    proc = _child(ENGINE_CHILD, *args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"resume after SIGKILL at step {kill_at} failed:\n{err[-3000:]}"
    starts = [e for e in read_events(run_dir / EVENTS_FILENAME) if e.kind == "run_started"]
    assert [e.resumed_from_step for e in starts] == [0, newest], f"killed at step {kill_at}"
    assert _step_losses(run_dir) == _step_losses(tmp_path / "ref"), f"killed at step {kill_at}"
    outputs = [e for e in read_events(run_dir / EVENTS_FILENAME) if e.kind == "run_ended"][-1].outputs
    resumed, _ = load_lora(outputs["peft"])
    expected, _ = load_lora(reference.outputs["peft"])
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(resumed[key], expected[key], rtol=0, atol=0), f"{key} (killed at step {kill_at})"


def test_sigterm_writes_a_checkpoint_and_exits_with_the_stopped_code(tiny_model_dir, tmp_path):
    config = demo_config(tiny_model_dir, tmp_path / "runs")
    for key, value in {"optim.max_steps": 400, "checkpoint.every_steps": 0, "logging.every_steps": 1}.items():
        config = with_value(config, key, value)
    preset = save_config(config, tmp_path / "preset.toml", full=True)
    run_dir = tmp_path / "run"

    proc = _child(HEADLESS_CHILD, preset, run_dir)
    _wait_for_line(proc, lambda line: line.startswith("step 3/400"))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-2000:]}"
    assert "SIGTERM: stopping" in out and "stopped: stopped at step" in err
    events = read_events(run_dir / EVENTS_FILENAME)
    saved = [e for e in events if e.kind == "checkpoint_saved"]
    assert len(saved) == 1 and saved[0].reason == "stop" and Path(saved[0].path).exists()
    assert events[-1].kind == "run_ended" and events[-1].status == "stopped"
    assert 3 <= saved[0].step < 400
    assert EXIT_OK == 0
