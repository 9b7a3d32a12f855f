"""The run folder under faults (issue 14), part 3: real processes. A second process on a run folder, a run killed
with SIGKILL, and impatient Ctrl-Cs, each against a headless run in a child process on the tiny model.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine import fsio
from engine.config import save_config
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from engine.train import checkpoint as ckpt
from s2v_tui.commands.headless import EXIT_CONFIG, EXIT_OK, EXIT_STOPPED
from test_run_folder_faults import checkpoint_steps, headless, one_line, train
from test_train_run import _config, _kinds
from test_train_signals import _wait_for_line

ROOT = Path(__file__).resolve().parents[1]


# ---- 5 and 7: real processes --------------------------------------------------------------------------------------
# A headless run in a child; argv: mode, preset, run folder. Modes slow it down where the parent needs to act:
# "stall" holds the first checkpoint write half done until the file `go` appears beside the run folder;
# "slow" sleeps in step 3; "slow_prune" sleeps between writing the checkpoint of step 3 and pruning;
# "slow_close" sleeps when the run closes its event log, after its end was written.
CHILD = r"""
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from engine import fsio
from engine.train import checkpoint as ckpt
from engine.train.loop import Trainer
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.headless import run_headless

mode, preset, run_dir = sys.argv[1:4]
if mode == "stall":
    real_write, stalled = fsio._write_all, []
    def write_all(fd, data):
        if len(data) > 100_000 and not stalled:
            stalled.append(True)
            half = len(data) // 2
            real_write(fd, memoryview(data)[:half])
            print("WRITING", flush=True)
            while not (Path(run_dir).parent / "go").exists():
                time.sleep(0.05)
            data = memoryview(data)[half:]
        real_write(fd, data)
    fsio._write_all = write_all
elif mode == "slow":
    real_step = Trainer.train_step
    def train_step(self):
        event = real_step(self)
        if self.step == 3:
            time.sleep(10)  # before step 3 is told: the parent kills the run here, behind the checkpoint of step 2
        return event
    Trainer.train_step = train_step
elif mode == "slow_close":
    from engine.event_log import JsonlEventWriter
    real_close = JsonlEventWriter.close
    def close(self):
        print("CLOSING", flush=True)
        time.sleep(3)
        real_close(self)
    JsonlEventWriter.close = close
elif mode == "slow_prune":
    real_prune = ckpt.prune_checkpoints
    def prune(run_dir, keep_last, protect=None):
        if protect is not None and protect.name == "step-00000003.pt":
            print("PRUNING", flush=True)
            time.sleep(3)
        return real_prune(run_dir, keep_last, protect)
    ckpt.prune_checkpoints = prune
sys.exit(run_headless(preset, run_dir=run_dir, dataset=SyntheticLatentDataset(2), device="cpu"))
"""


def _child(mode: str, preset: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, str(preset), str(run_dir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _preset(tiny_model_dir, tmp_path: Path, **overrides) -> Path:
    config = _config(tiny_model_dir, tmp_path, logging__every_steps=1, **overrides)
    return save_config(config, tmp_path / "preset.toml", full=True)


def test_a_second_process_on_a_run_folder_is_refused_and_leaves_the_first_ones_temp_files(
        tiny_model_dir, tmp_path, capsys):
    preset = _preset(tiny_model_dir, tmp_path, optim__max_steps=4, checkpoint__every_steps=2)
    run_dir = tmp_path / "run"
    first = _child("stall", preset, run_dir)
    try:
        _wait_for_line(first, lambda line: line.strip() == "WRITING")
        temps = sorted((run_dir / "checkpoints").glob("*" + fsio.TEMP_SUFFIX))
        assert len(temps) == 1  # the first run's checkpoint, half written
        assert headless(preset, run_dir) == EXIT_CONFIG
        err = one_line(capsys.readouterr().err)
        assert f"process {first.pid}" in err and "in use" in err and "Traceback" not in err
        assert sorted((run_dir / "checkpoints").glob("*" + fsio.TEMP_SUFFIX)) == temps
        (tmp_path / "go").touch()
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == EXIT_OK, err[-3000:]
    assert checkpoint_steps(run_dir) == [2, 4]
    assert all(ckpt.load_checkpoint(p)["step"] == s for s, p in ckpt.list_checkpoints(run_dir))
    # The refused start wrote nothing into the first run's event log.
    logged = read_events(run_dir / EVENTS_FILENAME)
    assert [e.kind for e in logged].count("run_started") == 1
    assert [e.status for e in logged if e.kind == "run_ended"] == ["completed"]


def test_the_lock_of_a_killed_run_is_recovered_by_the_next_start(tiny_model_dir, tmp_path):
    preset = _preset(tiny_model_dir, tmp_path, optim__max_steps=6, checkpoint__every_steps=2)
    run_dir = tmp_path / "run"
    proc = _child("slow", preset, run_dir)
    try:
        _wait_for_line(proc, lambda line: line.startswith("checkpoint (interval) at step 2"))
        time.sleep(0.5)  # into the sleep of step 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert (run_dir / ".run.lock").read_text().strip()  # the dead owner's note is still there
    config = _config(tiny_model_dir, tmp_path, logging__every_steps=1, optim__max_steps=6, checkpoint__every_steps=2)
    end = train(config, run_dir)
    assert end.status == "completed", end.reason
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 2
    assert f"process {proc.pid} no longer runs" in (run_dir / "train.log").read_text()


def test_a_double_ctrl_c_stops_cleanly_and_the_rerun_resumes(tiny_model_dir, tmp_path):
    preset = _preset(tiny_model_dir, tmp_path, optim__max_steps=8, checkpoint__every_steps=1,
                     checkpoint__keep_last=2)
    run_dir = tmp_path / "run"
    proc = _child("slow_prune", preset, run_dir)
    try:
        _wait_for_line(proc, lambda line: line.strip() == "PRUNING")  # the checkpoint of step 3 is written
        proc.send_signal(signal.SIGINT)
        _wait_for_line(proc, lambda line: line.startswith("SIGINT: stopping"))
        proc.send_signal(signal.SIGINT)  # impatient: abort at once
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_STOPPED, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err and err.startswith("stopped: ")
    end = read_events(run_dir / EVENTS_FILENAME)[-1]
    assert end.kind == "run_ended" and end.status == "stopped" and "Ctrl-C" in end.reason
    assert "newest good checkpoint is step 3" in one_line(end.reason)

    config = _config(tiny_model_dir, tmp_path, logging__every_steps=1, optim__max_steps=8, checkpoint__every_steps=1,
                     checkpoint__keep_last=2)
    starts = []
    end = train(config, run_dir, [lambda e: starts.append(len(ckpt.list_checkpoints(run_dir)))
                                  if e.kind == "run_started" else None])
    assert starts == [2]  # the next start pruned what the abort left beyond keep_last
    assert end.status == "completed", end.reason
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 3
    assert checkpoint_steps(run_dir) == [7, 8]


def test_a_double_ctrl_c_while_a_finished_run_closes_changes_nothing(tiny_model_dir, tmp_path):
    """Ctrl-C twice while the run's files are being closed (a slow disk): the run had ended, so the end stands and
    the folder is released; it used to end in a KeyboardInterrupt traceback with the lock left to the kernel."""
    preset = _preset(tiny_model_dir, tmp_path, optim__max_steps=2, checkpoint__every_steps=0)
    run_dir = tmp_path / "run"
    proc = _child("slow_close", preset, run_dir)
    try:
        _wait_for_line(proc, lambda line: line.strip() == "CLOSING")
        proc.send_signal(signal.SIGINT)
        _wait_for_line(proc, lambda line: line.startswith("SIGINT: stopping"))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_OK, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert read_events(run_dir / EVENTS_FILENAME)[-1].status == "completed"
    assert (run_dir / ".run.lock").read_text() == ""  # released: the note was emptied
