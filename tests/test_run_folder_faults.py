"""The run folder under faults (issue 14), part 1: changed configs, bad --set values, bit flips, NaN streaks.

Each test plays an ordinary user who does something the run folder must survive, on the tiny model (CPU), and
checks that no trained state is lost: checkpoints and exports are only ever added, a refusal changes nothing.
Part 2 (test_run_folder_faults_io.py) covers failing writes, part 3 (test_run_folder_faults_procs.py) twin
processes and signals.
"""
from __future__ import annotations

import hashlib
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch

from engine.config import FROZEN_FILENAME, save_config
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from engine.runner import run
from engine.train import checkpoint as ckpt
from engine.models.lora import load_lora
from s2v_tui.commands.headless import EXIT_CONFIG, EXIT_OK, run_headless
from test_train_run import _config, _kinds, demo_dataset, step_file_names  # tests/ is on sys.path under pytest

NAME = "demo-lora"  # output.name of the demo config
APPENDED_LOGS = ("events.jsonl", "train.log")  # a refused start appends its end there, and changes nothing else


# ---- helpers used by both parts -----------------------------------------------------------------------------------
def train(config, run_dir: Path, subscribers=(), stop=None):
    return run(config, list(subscribers), stop, run_dir=run_dir, dataset=demo_dataset(), device="cpu")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> SHA-256), the lock file included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_untouched(folder: Path, before: dict[str, bytes], logs_before: dict[str, bytes]) -> None:
    """Nothing in `folder` changed, was added or removed, except lines appended to the two logs."""
    after = snapshot(folder)
    assert sorted(after) == sorted(before), "files were added or removed"
    changed = [name for name in after if after[name] != before[name] and name not in APPENDED_LOGS]
    assert not changed, f"changed: {changed}"
    for name in APPENDED_LOGS:
        if name in logs_before:
            assert (folder / name).read_bytes().startswith(logs_before[name]), f"{name} was rewritten"


def read_logs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in APPENDED_LOGS if (folder / name).exists()}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(step for step, _ in ckpt.list_checkpoints(run_dir))


def step_ends(run_dir: Path, since_start: int = -1):
    """The step_end events after the `since_start`-th run_started (the last run by default)."""
    events = read_events(run_dir / EVENTS_FILENAME)
    starts = [i for i, e in enumerate(events) if e.kind == "run_started"]
    return [e for e in events[starts[since_start]:] if e.kind == "step_end"]


def one_line(text: str) -> str:
    """The headless face wraps its closing paragraph at 100 columns; tests read it as one line."""
    return " ".join(text.split())


def headless(preset: Path, run_dir: Path, *overrides: str) -> int:
    import io

    return run_headless(str(preset), overrides=overrides, run_dir=str(run_dir), stream=io.StringIO(),
                        dataset=demo_dataset(), device="cpu")


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A finished run of 4 steps (checkpoints every 2, keep_last 2): (config, run folder). Tests copy it."""
    tmp = tmp_path_factory.mktemp("finished")
    config = _config(tiny_model_dir, tmp, optim__max_steps=4, checkpoint__every_steps=2, checkpoint__keep_last=2)
    end = train(config, tmp / "run")
    assert end.status == "completed", end.reason
    assert checkpoint_steps(tmp / "run") == [2, 4]
    return config, tmp / "run"


def copy_of(finished, tmp_path: Path) -> Path:
    """A copy of the finished run in another place: a copied folder is the same run."""
    target = tmp_path / "copied" / "run"
    shutil.copytree(finished[1], target)
    return target


# ---- 1. a changed frozen config --------------------------------------------------------------------------------
def _assert_continued_to_6(run_dir: Path, end, export_before: bytes) -> None:
    assert end.status == "completed", end.reason
    start = _kinds(run_dir, "run_started")[-1]
    assert start.resumed_from_step == 4 and start.total_steps == 6
    assert [e.step for e in step_ends(run_dir)] == [5, 6]  # only the new steps were trained
    # The earlier export stays with the name of its step; the new one is the LoRA of step 6.
    kept = run_dir / f"{NAME}_peft.step4.safetensors"
    assert kept.read_bytes() == export_before
    assert load_lora(run_dir / f"{NAME}_peft.safetensors")[1]["steps"] == "6"
    assert (run_dir / f"{NAME}_native.step4.safetensors").exists()
    # keep_last = 2: the checkpoint the run continued from stays beside the new one.
    assert checkpoint_steps(run_dir) == [4, 6]
    assert "max_steps = 6" in (run_dir / FROZEN_FILENAME).read_text()


def test_raising_max_steps_in_the_config_given_continues_the_run(finished, tmp_path):
    config, _ = finished
    run_dir = copy_of(finished, tmp_path)
    export = (run_dir / f"{NAME}_peft.safetensors").read_bytes()
    from engine.config import with_value

    end = train(with_value(config, "optim.max_steps", 6), run_dir)
    _assert_continued_to_6(run_dir, end, export)


def test_a_resume_may_change_what_is_reported_and_kept_but_not_what_is_trained(finished, tmp_path):
    """Logging, the checkpoint interval and count, the export layouts and memory placement change no tensor and
    no random draw: the continued run takes them. The identity hash, which the checkpoints carry, leaves them out."""
    from engine.config import with_value

    config, _ = finished
    run_dir = copy_of(finished, tmp_path)
    changed = config
    for key, value in (("optim.max_steps", 6), ("logging.every_steps", 1), ("checkpoint.keep_last", 5),
                       ("checkpoint.every_steps", 1), ("output.formats", ["peft"]),
                       ("memory.gradient_checkpointing", False)):
        changed = with_value(changed, key, value)
    assert changed.identity_hash() == config.identity_hash()
    end = train(changed, run_dir)
    assert end.status == "completed", end.reason
    assert set(end.outputs) == {"peft"}
    assert checkpoint_steps(run_dir) == [2, 4, 5, 6]  # every step now, up to 5 kept
    assert "checkpoint.keep_last 2 -> 5" in (run_dir / "train.log").read_text()


def test_raising_max_steps_by_editing_the_frozen_config_continues_the_run(finished, tmp_path):
    config, _ = finished
    run_dir = copy_of(finished, tmp_path)
    export = (run_dir / f"{NAME}_peft.safetensors").read_bytes()
    frozen = run_dir / FROZEN_FILENAME
    text = frozen.read_text()
    assert "max_steps = 4" in text
    frozen.write_text(text.replace("max_steps = 4", "max_steps = 6"))  # by hand, as a user would
    end = train(config, run_dir)  # the command that started the run, unchanged
    _assert_continued_to_6(run_dir, end, export)


def test_deleted_frozen_config_then_more_steps_continues_the_run(finished, tmp_path):
    config, _ = finished
    run_dir = copy_of(finished, tmp_path)
    export = (run_dir / f"{NAME}_peft.safetensors").read_bytes()
    (run_dir / FROZEN_FILENAME).unlink()
    from engine.config import with_value

    end = train(with_value(config, "optim.max_steps", 6), run_dir)
    _assert_continued_to_6(run_dir, end, export)


def test_more_steps_after_the_checkpoints_were_deleted_starts_over_and_keeps_the_exports(finished, tmp_path):
    """Someone freed disk space by deleting checkpoints/: a longer run starts over (there is nothing to continue
    from, and it says so), and the earlier export stays beside the new one."""
    config, _ = finished
    run_dir = copy_of(finished, tmp_path)
    export = (run_dir / f"{NAME}_peft.safetensors").read_bytes()
    shutil.rmtree(run_dir / "checkpoints")
    from engine.config import with_value

    end = train(with_value(config, "optim.max_steps", 6), run_dir)
    assert end.status == "completed", end.reason
    assert [e.step for e in step_ends(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / f"{NAME}_peft.step4.safetensors").read_bytes() == export
    log = (run_dir / "train.log").read_text()
    assert "training starts over" in log and "step -1" not in log


@pytest.mark.parametrize("override, key", [("optim.lr=0.001", "optim.lr"), ("lora.rank=4", "lora.rank")])
def test_another_setting_on_a_trained_run_is_refused_and_nothing_changes(finished, tmp_path, capsys, override, key):
    config, _ = finished
    run_dir = copy_of(finished, tmp_path)
    preset = save_config(config, tmp_path / "preset.toml", full=True)
    before, logs = snapshot(run_dir), read_logs(run_dir)
    assert headless(preset, run_dir, override) == EXIT_CONFIG
    err = one_line(capsys.readouterr().err)
    assert key in err and "Nothing was changed" in err and "output.name" in err and "Traceback" not in err
    assert_untouched(run_dir, before, logs)
    end = _kinds(run_dir, "run_ended")[-1]
    assert end.status == "refused" and key in end.reason


def test_a_frozen_config_edited_to_another_lr_is_refused_and_nothing_changes(finished, tmp_path, capsys):
    config, _ = finished
    run_dir = copy_of(finished, tmp_path)
    frozen = run_dir / FROZEN_FILENAME
    frozen.write_text(frozen.read_text().replace("lr = 0.015", "lr = 0.001"))
    preset = save_config(config, tmp_path / "preset.toml", full=True)
    before, logs = snapshot(run_dir), read_logs(run_dir)
    assert headless(preset, run_dir) == EXIT_CONFIG
    err = one_line(capsys.readouterr().err)
    assert "optim.lr" in err and "edit" in err
    assert_untouched(run_dir, before, logs)


def test_a_frozen_config_edit_that_cannot_be_read_is_refused_not_overwritten(finished, tmp_path, capsys):
    """A typo while extending the run (a string for max_steps) was thrown away: the file was restored from the
    checkpoint and the run 'completed' at its old 4 steps."""
    config, _ = finished
    run_dir = copy_of(finished, tmp_path)
    frozen = run_dir / FROZEN_FILENAME
    frozen.write_text(frozen.read_text().replace("max_steps = 4", 'max_steps = "6"'))
    preset = save_config(config, tmp_path / "preset.toml", full=True)
    before, logs = snapshot(run_dir), read_logs(run_dir)
    assert headless(preset, run_dir) == EXIT_CONFIG
    err = one_line(capsys.readouterr().err)
    assert "max_steps" in err and "cannot be read" in err and "delete it" in err
    assert_untouched(run_dir, before, logs)
    frozen.unlink()  # the way out the refusal names
    assert headless(preset, run_dir) == EXIT_OK
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 4


def test_max_steps_lowered_below_the_step_reached_is_refused(finished, tmp_path, capsys):
    config, _ = finished
    run_dir = copy_of(finished, tmp_path)
    preset = save_config(config, tmp_path / "preset.toml", full=True)
    before, logs = snapshot(run_dir), read_logs(run_dir)
    assert headless(preset, run_dir, "optim.max_steps=3") == EXIT_CONFIG
    err = one_line(capsys.readouterr().err)
    assert "trained to step 4" in err and "optim.max_steps" in err
    assert_untouched(run_dir, before, logs)


def test_a_start_refused_for_a_bad_value_writes_nothing_and_the_fix_runs(tiny_model_dir, tmp_path, capsys):
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=2, checkpoint__every_steps=0)
    preset = save_config(config, tmp_path / "preset.toml", full=True)
    run_dir = tmp_path / "runs" / "run"
    assert headless(preset, run_dir, "optim.lr=-1") == EXIT_CONFIG
    assert "optim.lr" in capsys.readouterr().err
    assert not run_dir.exists()  # no folder, so no frozen copy of the wrong value
    assert headless(preset, run_dir, "optim.lr=0.001") == EXIT_OK
    assert "lr = 0.001" in (run_dir / FROZEN_FILENAME).read_text()


def test_frozen_config_of_a_failed_start_gives_way_to_the_corrected_one(tiny_model_dir, tmp_path):
    """A start that failed before its first step (a switch this machine lacks) froze its config; the corrected
    config replaces that copy, since nothing was trained with it."""
    run_dir = tmp_path / "run"
    bad = _config(tiny_model_dir, tmp_path, optim__max_steps=2, memory__block_offload=True)
    assert train(bad, run_dir).status == "failed"
    assert "block_offload = true" in (run_dir / FROZEN_FILENAME).read_text()
    good = _config(tiny_model_dir, tmp_path, optim__max_steps=2)
    end = train(good, run_dir)
    assert end.status == "completed", end.reason
    assert "block_offload = false" in (run_dir / FROZEN_FILENAME).read_text()


def test_a_start_stopped_before_its_first_step_leaves_nothing_trained(tiny_model_dir, tmp_path):
    """Ctrl-C (or SIGTERM) while the model loads: there is nothing to checkpoint at step 0, so the folder holds no
    trained state and a corrected config is accepted (it was refused as 'trained to step 0')."""
    run_dir = tmp_path / "run"
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=2)
    stop = threading.Event()

    def stop_while_loading(event):
        if event.kind == "phase_changed" and event.phase == "load":
            stop.set()

    end = train(config, run_dir, [stop_while_loading], stop)
    assert end.status == "stopped" and "step 0" in end.reason
    assert checkpoint_steps(run_dir) == []
    end = train(_config(tiny_model_dir, tmp_path, optim__max_steps=2, optim__lr=1e-3), run_dir)
    assert end.status == "completed", end.reason


def test_a_host_ram_stop_at_step_0_does_not_hold_the_folder_to_its_config(tiny_model_dir, tmp_path, monkeypatch):
    """The host-RAM guard tripping right after the load writes a checkpoint of step 0 (its message promises one);
    that checkpoint holds nothing trained, so a config that needs less memory is accepted in the same folder."""
    from engine.train.host_guard import HostMemoryGuard

    short = ["Host RAM ran short (test)."]
    monkeypatch.setattr(HostMemoryGuard, "check", lambda self: short[0] if short else None)
    run_dir = tmp_path / "run"
    end = train(_config(tiny_model_dir, tmp_path, optim__max_steps=2), run_dir)
    assert end.status == "failed" and "Host RAM ran short" in end.reason
    assert checkpoint_steps(run_dir) == [0]
    short.clear()
    smaller = _config(tiny_model_dir, tmp_path, optim__max_steps=2, lora__rank=4)  # not a placement key
    end = train(smaller, run_dir)
    assert end.status == "completed", end.reason
    assert "rank = 4" in (run_dir / FROZEN_FILENAME).read_text()


def _lora(end) -> dict[str, torch.Tensor]:
    return load_lora(end.outputs["peft"])[0]


def test_constant_schedule_continued_run_equals_the_longer_run_bit_for_bit(tiny_model_dir, tmp_path):
    """A continued run is a resume with more steps: with a constant learning rate nothing else depends on
    optim.max_steps, so 3 steps then 3 more give exactly the LoRA of 6 steps at once."""
    short = _config(tiny_model_dir, tmp_path, optim__max_steps=3, optim__schedule="constant",
                    checkpoint__every_steps=0)
    long = _config(tiny_model_dir, tmp_path, optim__max_steps=6, optim__schedule="constant",
                   checkpoint__every_steps=0)
    reference = train(long, tmp_path / "long")
    assert train(short, tmp_path / "extended").status == "completed"
    extended = train(long, tmp_path / "extended")
    assert extended.status == "completed", extended.reason
    a, b = _lora(reference), _lora(extended)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {e.step: e.loss for e in _kinds(tmp_path / "extended", "step_end")}
    assert losses == {e.step: e.loss for e in _kinds(tmp_path / "long", "step_end")}


def test_cosine_schedule_continued_run_follows_the_longer_curve_from_the_resumed_step(tiny_model_dir, tmp_path):
    """With cosine the schedule is re-planned over the new max_steps: from the resumed step on, the learning rate
    is the longer schedule's value at that step (steps 1-3 ran on the shorter curve, so the weights differ)."""
    short = _config(tiny_model_dir, tmp_path, optim__max_steps=3, optim__schedule="cosine", checkpoint__every_steps=0)
    long = _config(tiny_model_dir, tmp_path, optim__max_steps=6, optim__schedule="cosine", checkpoint__every_steps=0)
    assert train(long, tmp_path / "long").status == "completed"
    assert train(short, tmp_path / "extended").status == "completed"
    assert train(long, tmp_path / "extended").status == "completed"
    want = {e.step: e.lr for e in _kinds(tmp_path / "long", "step_end")}
    got = {e.step: e.lr for e in step_ends(tmp_path / "extended")}
    assert sorted(got) == [4, 5, 6]
    assert got == pytest.approx({step: want[step] for step in got}, rel=1e-12)
    assert got[4] > 0 and got[4] != pytest.approx(0.0)  # the short curve had reached 0 at its end


# ---- 3. bit flips and NaN streaks ---------------------------------------------------------------------------
def flip_exponents(path: Path, tensor: torch.Tensor, count: int = 256) -> int:
    """Flip an exponent bit of up to `count` float32 values of `tensor` where its bytes lie in `path`'s data;
    returns the file offset of the flipped run."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes are not found once in the file"
    n = min(count, len(raw) // 4)
    for i in range(n):
        (value,) = struct.unpack_from("<I", data, at + 4 * i)
        struct.pack_into("<I", data, at + 4 * i, value ^ 0x40000000)  # bit 30: the exponent's top bit
    path.write_bytes(bytes(data))
    return at


def test_bit_flips_in_the_newest_checkpoint_are_rejected_and_the_run_resumes_from_the_previous(finished, tmp_path):
    config, _ = finished
    run_dir = copy_of(finished, tmp_path)
    newest = ckpt.checkpoint_path(run_dir, 4)
    state = torch.load(newest, weights_only=True)
    biggest = max((t for t in state["lora"].values()), key=torch.Tensor.numel)
    at = flip_exponents(newest, biggest)
    assert 0 < at < newest.stat().st_size - 1024  # inside the tensor data, not the zip's directory
    from engine.config import with_value

    end = train(with_value(config, "optim.max_steps", 6), run_dir)
    assert end.status == "completed", end.reason
    skipped = [e for e in _kinds(run_dir, "warning") if e.code == "checkpoint_skipped"]
    assert len(skipped) == 1 and "step-00000004.pt" in skipped[0].message and "SHA-256" in skipped[0].message
    rejected = run_dir / "checkpoints" / "rejected"
    assert sorted(p.name for p in rejected.iterdir()) == sorted([*step_file_names(4), "step-00000004.reason.txt"])
    assert "SHA-256" in (rejected / "step-00000004.reason.txt").read_text()
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 2
    steps = step_ends(run_dir)
    assert [e.step for e in steps] == [3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in steps)
    # The rejected checkpoint holds no keep_last slot: two good ones are kept.
    assert checkpoint_steps(run_dir) == [4, 6]
    assert all(ckpt.load_checkpoint(p) for _, p in ckpt.list_checkpoints(run_dir))


def test_a_nan_streak_never_prunes_the_newest_healthy_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from engine.train import loop

    real, calls = loop.flow_loss, []

    def nan_after_step_2(prediction, target):
        calls.append(1)
        loss = real(prediction, target)
        return loss * float("nan") if len(calls) > 2 else loss

    monkeypatch.setattr(loop, "flow_loss", nan_after_step_2)
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=10, checkpoint__every_steps=1,
                     checkpoint__keep_last=2, train__nonfinite_max_in_a_row=3)
    run_dir = tmp_path / "run"
    end = train(config, run_dir)
    assert end.status == "failed" and "3 steps in a row" in end.reason
    assert "newest good checkpoint is step 2" in end.reason
    assert 2 in checkpoint_steps(run_dir)
    healthy = ckpt.newest_healthy(run_dir)
    assert healthy == ckpt.checkpoint_path(run_dir, 2)
    assert all(torch.isfinite(t).all() for t in ckpt.load_checkpoint(healthy)["lora"].values())


# ---- 4. --set obeys the file's rules -------------------------------------------------------------------------
@pytest.mark.parametrize("override, wanted", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.lrr=1e-4", "optim.lr"), ("optim.max_step=5", "max_steps")])
def test_a_bad_set_value_exits_2_before_the_run_folder_exists(tiny_model_dir, tmp_path, capsys, override, wanted):
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=2)
    preset = save_config(config, tmp_path / "preset.toml", full=True)
    run_dir = tmp_path / "runs" / "run"
    assert headless(preset, run_dir, override) == EXIT_CONFIG
    err = one_line(capsys.readouterr().err)
    assert wanted in err and "--set" in err and "Traceback" not in err
    assert not run_dir.exists()
