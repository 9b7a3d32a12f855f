"""Issue 16: a LoRA file per checkpoint, in every layout of output.formats, beside the full-state checkpoint.

On the tiny model (CPU): the files, their header (the final export's), their record, pruning with their checkpoint,
the EMA choice, the free-space check, a damaged file set aside and written again, the out-of-memory save, and a
run killed (SIGKILL, a real child process) in the middle of a checkpoint's writes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.train import checkpoint as ckpt
from engine.models.lora import load_lora
from test_run_folder_faults import checkpoint_steps, copy_of, train
from test_train_run import _config, _kinds, step_file_names

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("peft", "native")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def assert_checkpoint_loras_hold(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """Both LoRA files of the checkpoint at `path` are as its record says and load to exactly `weights`."""
    assert ckpt.lora_problems(path) == {}
    for layout in LAYOUTS:
        state, meta = load_lora(ckpt.lora_path(path, layout))
        assert meta["layout"] == layout and state.keys() == weights.keys()
        assert all(torch.equal(state[k], weights[k]) for k in weights)


@pytest.fixture(scope="module")
def six_steps(tiny_model_dir, tmp_path_factory):
    """A finished run of 6 steps, checkpoints every 2, keep_last 2: (config, run folder, end)."""
    tmp = tmp_path_factory.mktemp("six")
    config = _config(tiny_model_dir, tmp, optim__max_steps=6, checkpoint__every_steps=2, checkpoint__keep_last=2)
    end = train(config, tmp / "run")
    assert end.status == "completed", end.reason
    return config, tmp / "run", end


def test_every_checkpoint_has_its_lora_files_recorded_and_pruned_with_it(six_steps):
    config, run_dir, _ = six_steps
    # Step 2 was pruned with every file of it; 4 and 6 stand, each with both layouts.
    assert sorted(p.name for p in ckpt.checkpoint_dir(run_dir).iterdir()) == step_file_names(4, 6)
    for step in (4, 6):
        path = ckpt.checkpoint_path(run_dir, step)
        state = ckpt.load_checkpoint(path)
        assert_checkpoint_loras_hold(path, state["lora"])
        record = json.loads(ckpt.digest_path(path).read_text())
        for layout in LAYOUTS:
            file = ckpt.lora_path(path, layout)
            assert record["loras"][layout] == {"file": file.name, "sha256": _sha(file), "bytes": file.stat().st_size}
        meta = _header(ckpt.lora_path(path, "peft"))
        assert meta["steps"] == str(step) and meta["weights"] == "trained" and meta["ema"] == "False"
        assert meta["identity"] == config.identity_hash() and json.loads(meta["lora_targets"]) == config.lora.targets


def same_lora(a: Path, b: Path) -> bool:
    """The same tensors and the same header (safetensors orders a header's metadata differently each time, so
    two writes of one LoRA may differ in their bytes)."""
    (state_a, meta_a), (state_b, meta_b) = load_lora(a), load_lora(b)
    return meta_a == meta_b and state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k])
                                                                         for k in state_a)


def test_the_last_checkpoints_lora_is_the_final_export(six_steps):
    """One function writes both: the same weights under the same header."""
    _, run_dir, end = six_steps
    final = ckpt.checkpoint_path(run_dir, 6)
    for layout in LAYOUTS:
        assert same_lora(ckpt.lora_path(final, layout), Path(end.outputs[layout]))


def test_with_ema_the_checkpoint_lora_holds_the_average_and_says_so(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=4, checkpoint__every_steps=2,
                     optim__ema__enabled=True, optim__ema__decay=0.5)
    end = train(config, tmp_path / "run")
    assert end.status == "completed", end.reason
    for step in (2, 4):
        path = ckpt.checkpoint_path(tmp_path / "run", step)
        state = ckpt.load_checkpoint(path)
        average = dict(zip(state["lora"], state["ema"]["shadow"], strict=True))
        assert any(not torch.equal(average[k], state["lora"][k]) for k in average)  # the test can tell them apart
        assert_checkpoint_loras_hold(path, average)
        assert _header(ckpt.lora_path(path, "native"))["weights"] == "ema"
    assert same_lora(ckpt.lora_path(path, "peft"), Path(end.outputs["peft"]))


def _unit_state(step: int) -> dict:
    return {"format_version": ckpt.FORMAT_VERSION, "step": step, "config_hash": "h", "lora": {"w": torch.ones(4)},
            "optimizer": {}, "scheduler": {}, "rng": ckpt.capture_rng(), "data": {}}


def test_the_free_space_check_counts_the_lora_files(tmp_path, monkeypatch):
    import io

    buffer = io.BytesIO()
    torch.save(_unit_state(3), buffer)
    loras = {"peft": b"p" * 5000, "native": b"n" * 5000}
    needed = len(buffer.getvalue()) + 10_000 + ckpt.SPACE_MARGIN
    monkeypatch.setattr(ckpt, "free_bytes", lambda folder: needed - 1)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        ckpt.save_checkpoint(tmp_path, _unit_state(3), keep_last=2, loras=loras)
    assert info.value.cause == "no_space" and not list(ckpt.checkpoint_dir(tmp_path).iterdir())
    monkeypatch.setattr(ckpt, "free_bytes", lambda folder: needed + 1000)  # torch.save sizes vary by a few bytes
    path = ckpt.save_checkpoint(tmp_path, _unit_state(3), keep_last=2, loras=loras)
    assert ckpt.lora_path(path, "native").read_bytes() == loras["native"]


def test_a_failed_pt_write_removes_the_lora_files_it_wrote(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _unit_state(3), keep_last=1, loras={"peft": b"three"})
    real = ckpt.atomic_write_bytes

    def full_at_the_pt(path, data):
        if Path(path).suffix == ".pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full_at_the_pt)
    with pytest.raises(ckpt.CheckpointWriteError):
        ckpt.save_checkpoint(tmp_path, _unit_state(6), keep_last=1, loras={"peft": b"six", "native": b"six"})
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()) == step_file_names(3, formats=("peft",))


def test_files_of_a_step_without_its_pt_are_never_counted_nor_deleted(tmp_path):
    """What a writer killed between its LoRA files and its .pt leaves: complete files, no checkpoint."""
    ckpt.save_checkpoint(tmp_path, _unit_state(3), keep_last=1, loras={"peft": b"three"})
    folder = ckpt.checkpoint_dir(tmp_path)
    (folder / "step-00000006.json").write_text('{"sha256": "x", "step": 6}')
    (folder / "step-00000006_peft.safetensors").write_bytes(b"six")
    state, path, skipped = ckpt.find_resume_state(tmp_path, "h", keep_last=1)
    assert state["step"] == 3 and not skipped and [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    assert ckpt.prune_checkpoints(tmp_path, 1) == [] and (folder / "step-00000006_peft.safetensors").exists()
    # Training reaches step 6 again: its files are written over, and the checkpoint of step 3 is pruned behind it.
    ckpt.save_checkpoint(tmp_path, _unit_state(6), keep_last=1, loras={"peft": b"six again"})
    assert sorted(p.name for p in folder.iterdir()) == step_file_names(6, formats=("peft",))
    assert ckpt.lora_problems(ckpt.checkpoint_path(tmp_path, 6)) == {}


def test_a_damaged_lora_file_is_set_aside_and_written_again_from_its_checkpoint(six_steps, tmp_path):
    config, _, _ = six_steps
    run_dir = copy_of(six_steps, tmp_path)
    newest = ckpt.checkpoint_path(run_dir, 6)
    native = ckpt.lora_path(newest, "native")
    good = tmp_path / "good.safetensors"
    good.write_bytes(native.read_bytes())
    damaged = bytearray(good.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10  # one bit, inside the tensor data
    native.write_bytes(bytes(damaged))
    assert set(ckpt.lora_problems(newest)) == {"native"} and set(ckpt.lora_problems(newest, verify=False)) == set()

    end = train(config, run_dir)  # the same command again: the run is finished, so it only resumes and exports
    assert end.status == "completed", end.reason
    warnings = [e.message for e in _kinds(run_dir, "warning") if e.code == "checkpoint_skipped"]
    assert len(warnings) == 1 and "checkpoint LoRA file" in warnings[0] and native.name in warnings[0]
    assert "SHA-256" in warnings[0] and "written again" in warnings[0]
    rejected = ckpt.checkpoint_dir(run_dir) / ckpt.REJECTED_DIR
    assert (rejected / native.name).read_bytes() == bytes(damaged)
    assert "SHA-256" in (rejected / f"{native.name}.reason.txt").read_text()
    assert same_lora(native, good) and ckpt.lora_problems(newest) == {}  # the file as it was, and recorded
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 6 and checkpoint_steps(run_dir) == [4, 6]


def test_a_layout_added_on_resume_is_written_for_the_checkpoint_resumed_from(tiny_model_dir, tmp_path):
    from engine.config import with_value

    config = _config(tiny_model_dir, tmp_path, optim__max_steps=2, checkpoint__every_steps=0,
                     output__formats=["peft"])
    assert train(config, tmp_path / "run").status == "completed"
    path = ckpt.checkpoint_path(tmp_path / "run", 2)
    assert not ckpt.lora_path(path, "native").exists()
    end = train(with_value(config, "output.formats", ["peft", "native"]), tmp_path / "run")
    assert end.status == "completed", end.reason
    assert_checkpoint_loras_hold(path, ckpt.load_checkpoint(path)["lora"])


def test_out_of_memory_saves_the_lora_in_every_layout_with_the_export_header(tiny_model_dir, tmp_path, monkeypatch):
    from engine.train.loop import Trainer

    real = Trainer.train_step

    def oom_at_step_3(self):
        if self.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", oom_at_step_3)
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=6, checkpoint__every_steps=2)
    run_dir = tmp_path / "run"
    end = train(config, run_dir)
    assert end.status == "failed" and "out of memory at step 3" in end.reason
    files = [run_dir / f"demo-lora_emergency_step2_{layout}.safetensors" for layout in LAYOUTS]
    assert all(str(f) in end.reason for f in files)
    at_2 = ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 2))["lora"]
    for file, layout in zip(files, LAYOUTS, strict=True):
        state, meta = load_lora(file)
        assert all(torch.equal(state[k], at_2[k]) for k in at_2)
        assert meta["layout"] == layout and meta["steps"] == "2" and meta["identity"] == config.identity_hash()
        assert json.loads(meta["lora_targets"]) == config.lora.targets and meta["weights"] == "trained"
    assert [e.path for e in _kinds(run_dir, "checkpoint_saved") if e.reason == "oom"] == [str(f) for f in files]


# ---- a kill -9 in the middle of a checkpoint's writes ----------------------------------------------------------
# A headless run in a child; argv: the file name whose write stalls half done (until the child is killed), the
# preset, the run folder.
STALL_CHILD = r"""
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from engine import fsio
from engine.train import checkpoint as ckpt
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.headless import run_headless

target, preset, run_dir = sys.argv[1:4]
real_atomic, real_write, armed = ckpt.atomic_write_bytes, fsio._write_all, []

def atomic(path, data):
    if Path(path).name == target:
        armed.append(True)
    return real_atomic(path, data)

def write_all(fd, data):
    if armed:
        real_write(fd, memoryview(data)[: len(data) // 2])
        print("WRITING", flush=True)
        while True:
            time.sleep(1)
    real_write(fd, data)

ckpt.atomic_write_bytes, fsio._write_all = atomic, write_all
sys.exit(run_headless(preset, run_dir=run_dir, dataset=SyntheticLatentDataset(2), device="cpu"))
"""


@pytest.mark.parametrize("stalled", ["step-00000004_native.safetensors", "step-00000004.pt"])
def test_a_kill_9_during_a_checkpoint_write_keeps_the_previous_one_and_its_loras(tiny_model_dir, tmp_path, stalled):
    from test_run_folder_faults_procs import _preset
    from test_train_signals import _wait_for_line as _wait_for

    # keep_last 1: the checkpoint of step 2 is pruned only once that of step 4 is written and verified.
    overrides = dict(optim__max_steps=6, checkpoint__every_steps=2, checkpoint__keep_last=1)
    preset = _preset(tiny_model_dir, tmp_path, **overrides)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", STALL_CHILD, stalled, str(preset), str(run_dir)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, lambda line: line.strip() == "WRITING")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    folder = ckpt.checkpoint_dir(run_dir)
    previous = ckpt.checkpoint_path(run_dir, 2)
    assert_checkpoint_loras_hold(previous, ckpt.load_checkpoint(previous)["lora"])
    assert len(list(folder.glob(f".{stalled}.*.tmp"))) == 1  # the torn write is only a temp file
    # The files written before the .pt are there, complete, and count for nothing.
    assert not ckpt.checkpoint_path(run_dir, 4).exists()
    assert ckpt.lora_path(ckpt.checkpoint_path(run_dir, 4), "peft").exists()

    started = []
    end = train(_config(tiny_model_dir, tmp_path, logging__every_steps=1, **overrides), run_dir,
                [lambda e: started.append(e) if e.kind == "run_started" else None])
    assert end.status == "completed", end.reason
    assert started[0].resumed_from_step == 2 and not _kinds(run_dir, "warning")
    assert sorted(p.name for p in folder.iterdir()) == step_file_names(6)  # no temp file, nothing of 2 or 4 left
    final = ckpt.checkpoint_path(run_dir, 6)
    assert_checkpoint_loras_hold(final, ckpt.load_checkpoint(final)["lora"])
