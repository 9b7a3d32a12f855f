"""The run folder under faults (issue 14), part 2: writes that fail (read-only and full disks).

Each fault comes two ways: for real (a bind mount remounted read-only, a small tmpfs that fills) and injected (an
OSError from engine.fsio, engine.events or a patched free-space reading). The real ones need root (mount);
where mounting is not possible they skip, saying why, and the injected variant still runs.
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from engine import fsio
from engine.config import save_config, with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from engine.train import checkpoint as ckpt
from s2v_tui.commands.headless import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from test_run_folder_faults import checkpoint_steps, headless, one_line, step_ends, train
from test_train_run import _config, _kinds, demo_dataset, step_file_names


# ---- real mounts ------------------------------------------------------------------------------------------------
def _mount(*args: str) -> str:
    """Run mount(8); the error text, or "" when it worked."""
    try:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


@pytest.fixture
def mounts():
    """mount(*args, target): mounts, or skips the test saying why it cannot; everything is unmounted after."""
    done: list[Path] = []

    def mount(*args: str) -> None:
        error = _mount(*args)
        if error:
            pytest.skip(f"cannot mount here (mount {' '.join(args)}): {error}")
        done.append(Path(args[-1]))

    yield mount
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _read_only_bind(mount, folder: Path) -> None:
    """`folder` bound onto itself, with remounting it read-only and back checked to work."""
    folder.mkdir(parents=True, exist_ok=True)
    mount("--bind", str(folder), str(folder))
    for flags in ("remount,ro,bind", "remount,rw,bind"):
        error = _mount("-o", flags, str(folder))
        if error:
            pytest.skip(f"cannot remount a bind mount here: {error}")


# ---- 2. failing checkpoint writes ---------------------------------------------------------------------------------
def _assert_stopped_read_only(end, run_dir: Path) -> None:
    assert end.status == "failed"
    reason = one_line(end.reason)
    assert "stopped at step 4" in reason and "read-only" in reason and "free disk space" not in reason
    assert "newest good checkpoint is step 2" in reason and "run the same command again" in reason
    assert max(e.step for e in _kinds(run_dir, "step_end")) == 4  # stopped at once, not trained on to step 8


def test_checkpoints_on_a_folder_remounted_read_only_stop_the_run_at_once(tiny_model_dir, tmp_path, mounts):
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"  # the whole run folder cannot be remounted: its logs are open for writing
    _read_only_bind(mounts, folder)
    remount_errors = []

    def read_only_after_step_2(event):
        if event.kind == "checkpoint_saved" and event.step == 2:
            remount_errors.append(_mount("-o", "remount,ro,bind", str(folder)))

    config = _config(tiny_model_dir, tmp_path, optim__max_steps=8, checkpoint__every_steps=2)
    end = train(config, run_dir, [read_only_after_step_2])
    if remount_errors != [""]:
        pytest.skip(f"the remount during the run failed: {remount_errors}")
    _assert_stopped_read_only(end, run_dir)
    assert checkpoint_steps(run_dir) == [2]
    assert _mount("-o", "remount,rw,bind", str(folder)) == ""
    end = train(config, run_dir)
    assert end.status == "completed", end.reason
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 2


def test_checkpoints_failing_with_erofs_stop_the_run_at_once(tiny_model_dir, tmp_path, monkeypatch):
    real, read_only = fsio._write_all, []

    def write_all(fd, data):
        if read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(fd, data)

    def read_only_after_step_2(event):
        if event.kind == "checkpoint_saved" and event.step == 2:
            read_only.append(True)

    monkeypatch.setattr(fsio, "_write_all", write_all)
    run_dir = tmp_path / "run"
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=8, checkpoint__every_steps=2)
    end = train(config, run_dir, [read_only_after_step_2])
    _assert_stopped_read_only(end, run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == step_file_names(2)


def _fill(folder: Path, leave: int) -> Path:
    """Fill `folder`'s filesystem with one file until about `leave` bytes are free (another writer)."""
    ballast = folder / "ballast"
    with open(ballast, "wb") as f:
        while (free := fsio.free_bytes(folder)) > leave:
            f.write(b"\0" * min(free - leave, 1 << 20))
            f.flush()
    return ballast


def test_a_small_disk_that_fills_stops_the_run_then_resumes_when_freed(tiny_model_dir, tmp_path, mounts, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    run_dir = disk / "run"
    # A 4 MiB disk holds a few tiny checkpoints but not the margin kept for full-size runs; another writer fills
    # it right after the check, so the write itself meets ENOSPC.
    monkeypatch.setattr(ckpt, "SPACE_MARGIN", 0)
    real_free, armed = ckpt.free_bytes, []

    def free_then_filled(folder):
        free = real_free(folder)
        if armed and not (disk / "ballast").exists():
            _fill(disk, leave=100_000)
        return free

    def arm_after_step_2(event):
        if event.kind == "checkpoint_saved" and event.step == 2:
            armed.append(True)

    monkeypatch.setattr(ckpt, "free_bytes", free_then_filled)
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=6, checkpoint__every_steps=2, checkpoint__keep_last=2)
    end = train(config, run_dir, [arm_after_step_2])
    assert end.status == "failed"
    reason = one_line(end.reason)
    assert "stopped at step 4" in reason and "no space" in reason and "newest good checkpoint is step 2" in reason
    # Only the checkpoint that stands: no temp file, no record of the step-4 checkpoint that never came.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == step_file_names(2)
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 2))["step"] == 2

    armed.clear()
    (disk / "ballast").unlink()
    end = train(config, run_dir)
    assert end.status == "completed", end.reason
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 2
    assert [e.step for e in step_ends(run_dir)] == [3, 4, 5, 6]


def test_the_free_space_check_refuses_before_any_temp_file_appears(tiny_model_dir, tmp_path, monkeypatch):
    writes, small = [], []
    real_write = ckpt.atomic_write_bytes
    monkeypatch.setattr(ckpt, "free_bytes", lambda folder: 3 * 2**20 if small else 2**40)
    monkeypatch.setattr(ckpt, "atomic_write_bytes", lambda path, data: (writes.append(Path(path).name),
                                                                        real_write(path, data))[1])
    real_mkstemp = fsio.tempfile.mkstemp
    monkeypatch.setattr(fsio.tempfile, "mkstemp", lambda **kw: (writes.append("temp"), real_mkstemp(**kw))[1])

    def disk_nearly_full_after_step_2(event):
        if event.kind == "checkpoint_saved" and event.step == 2:
            small.append(True)
            writes.clear()

    run_dir = tmp_path / "run"
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=6, checkpoint__every_steps=2)
    end = train(config, run_dir, [disk_nearly_full_after_step_2])
    assert end.status == "failed"
    reason = one_line(end.reason)
    assert "stopped at step 4" in reason and "no space" in reason and "3.0 MiB free" in reason
    assert "newest good checkpoint is step 2" in reason
    assert writes == []  # nothing was written for step 4, not even a temp file
    assert checkpoint_steps(run_dir) == [2]


# ---- 6. the event log through a brief full disk ----------------------------------------------------------------
def test_a_brief_full_disk_does_not_detach_the_event_log(tiny_model_dir, tmp_path, monkeypatch):
    from engine import event_log

    real, full = event_log._write_some, []

    def write_some(fd, data):
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    def disk_full_during_steps_2_to_3(event):
        if event.kind == "step_end" and event.step in (2, 4):
            (full.append if event.step == 2 else lambda _: full.clear())(True)

    monkeypatch.setattr(event_log, "_write_some", write_some)
    run_dir = tmp_path / "run"
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=5, checkpoint__every_steps=0)
    end = train(config, run_dir, [disk_full_during_steps_2_to_3])
    assert end.status == "completed", end.reason
    logged = read_events(run_dir / EVENTS_FILENAME)
    assert logged[-1].kind == "run_ended" and logged[-1].status == "completed"
    assert [e.step for e in logged if e.kind == "step_end"] == [1, 2, 3, 4, 5]
    assert "detached" not in (run_dir / "train.log").read_text()


# ---- a full disk at the start --------------------------------------------------------------------------------
def _assert_refused_for_space(code: int, out: str, err: str) -> None:
    assert code == EXIT_CONFIG
    assert "Traceback" not in err and err.startswith("error: ") and "no space" in one_line(err)
    assert "[load]" not in out  # refused before the model loads, not at the first checkpoint


def _tmpfs(mounts, tmp_path: Path) -> Path:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    return disk


def test_a_new_run_on_a_full_disk_exits_2(tiny_model_dir, tmp_path, mounts, capsys):
    disk = _tmpfs(mounts, tmp_path)
    _fill(disk, leave=0)
    code, out = _headless_run(_config(tiny_model_dir, tmp_path, optim__max_steps=2), disk / "run")
    _assert_refused_for_space(code, out, capsys.readouterr().err)


def test_a_new_run_whose_frozen_config_cannot_be_written_exits_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from engine import run_folder

    def full(config, run_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_folder, "write_frozen_config", full)
    code, out = _headless_run(_config(tiny_model_dir, tmp_path, optim__max_steps=2), tmp_path / "run")
    _assert_refused_for_space(code, out, capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _finished_on(disk: Path, tiny_model_dir, tmp_path: Path):
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=4, checkpoint__every_steps=2, checkpoint__keep_last=2)
    assert _headless_run(config, disk / "run")[0] == EXIT_OK
    return config, disk / "run"


def test_resuming_on_a_full_disk_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, mounts, monkeypatch,
                                                                   capsys):
    disk = _tmpfs(mounts, tmp_path)
    monkeypatch.setattr(ckpt, "SPACE_MARGIN", 0)  # 4 MiB holds the tiny checkpoints, not the full-size margin
    config, run_dir = _finished_on(disk, tiny_model_dir, tmp_path)
    longer = with_value(config, "optim.max_steps", 6)
    ballast = _fill(disk, leave=100_000)  # room for the frozen config, not for a checkpoint
    code, out = _headless_run(longer, run_dir)
    _assert_refused_for_space(code, out, capsys.readouterr().err)
    ballast.unlink()
    assert _headless_run(longer, run_dir)[0] == EXIT_OK
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 4


def test_resuming_with_too_little_free_space_is_refused_before_the_model_loads(tiny_model_dir, tmp_path,
                                                                               monkeypatch, capsys):
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=4, checkpoint__every_steps=2)
    assert _headless_run(config, tmp_path / "run")[0] == EXIT_OK
    monkeypatch.setattr(ckpt, "free_bytes", lambda folder: 2**20)
    code, out = _headless_run(with_value(config, "optim.max_steps", 6), tmp_path / "run")
    _assert_refused_for_space(code, out, capsys.readouterr().err)


def test_a_damaged_checkpoint_on_a_full_disk_is_set_aside_and_the_run_refused(tiny_model_dir, tmp_path, mounts,
                                                                              monkeypatch, capsys):
    from test_run_folder_faults import flip_exponents

    disk = _tmpfs(mounts, tmp_path)
    monkeypatch.setattr(ckpt, "SPACE_MARGIN", 0)
    config, run_dir = _finished_on(disk, tiny_model_dir, tmp_path)
    newest = ckpt.checkpoint_path(run_dir, 4)
    flip_exponents(newest, max(ckpt.load_checkpoint(newest)["lora"].values(), key=lambda t: t.numel()))
    ballast = _fill(disk, leave=0)
    code, out = _headless_run(config, run_dir)
    _assert_refused_for_space(code, out, capsys.readouterr().err)
    assert checkpoint_steps(run_dir) == [2]  # set aside (a rename needs no space); its reason could not be written
    ballast.unlink()
    code, out = _headless_run(with_value(config, "optim.max_steps", 6), run_dir)
    assert code == EXIT_OK, out[-2000:]
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 2


def test_any_other_write_failing_for_space_names_the_file_and_the_fix(tiny_model_dir, tmp_path, monkeypatch):
    """A write outside the checkpoints (a validation sample, a cache entry) that meets a full disk: the reason
    names the file and the fix, as for a checkpoint (it was "OSError: [Errno 28] ... (traceback in train.log)")."""
    from engine.train import loop

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "samples" / "step-2.mp4"))

    monkeypatch.setattr(loop.Trainer, "run", full)
    end = train(_config(tiny_model_dir, tmp_path, optim__max_steps=2), tmp_path / "run")
    assert end.status == "failed"
    assert "no space left on the device" in end.reason and "step-2.mp4" in end.reason
    assert "free disk space there" in end.reason and "OSError" not in end.reason


# ---- the export on a full disk ------------------------------------------------------------------------------
def _assert_export_failed_then_exports(config, run_dir: Path, code: int, err: str) -> None:
    assert code == EXIT_FAILED
    err = one_line(err)
    assert "could not be exported" in err and "no space" in err and "step-00000004.pt" in err
    assert "run the same command again" in err and "Traceback" not in err
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 4))["step"] == 4
    code, out = _headless_run(config, run_dir)
    assert code == EXIT_OK, out[-2000:]
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 4
    assert not step_ends(run_dir)  # nothing trained again, only exported
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == ["demo-lora_native.safetensors",
                                                                     "demo-lora_peft.safetensors"]


def test_an_export_on_a_full_disk_says_the_training_is_saved(tiny_model_dir, tmp_path, mounts, monkeypatch, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    monkeypatch.setattr(ckpt, "SPACE_MARGIN", 0)  # 4 MiB holds the tiny checkpoints, not the full-size margin

    def fill_after_the_final_checkpoint(event):
        if event.kind == "checkpoint_saved" and event.reason == "final":
            _fill(disk, leave=20_000)

    config = _config(tiny_model_dir, tmp_path, optim__max_steps=4, checkpoint__every_steps=2)
    code, _ = _headless_run(config, disk / "run", fill_after_the_final_checkpoint)
    err = capsys.readouterr().err
    (disk / "ballast").unlink()
    _assert_export_failed_then_exports(config, disk / "run", code, err)


def test_an_export_failing_with_enospc_says_the_training_is_saved(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from engine.train import export

    real, full = export.atomic_write_bytes, []

    def write(path, data):
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    def full_after_the_final_checkpoint(event):
        if event.kind == "checkpoint_saved" and event.reason == "final":
            full.append(True)

    monkeypatch.setattr(export, "atomic_write_bytes", write)
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=4, checkpoint__every_steps=2)
    code, _ = _headless_run(config, tmp_path / "run", full_after_the_final_checkpoint)
    err = capsys.readouterr().err
    full.clear()
    _assert_export_failed_then_exports(config, tmp_path / "run", code, err)


# ---- train.log on a full disk ------------------------------------------------------------------------------
def _headless_run(config, run_dir: Path, *subscribers) -> tuple[int, str]:
    import io

    from s2v_tui.commands.headless import run_config_headless

    out = io.StringIO()
    code = run_config_headless(config, out, run_dir=str(run_dir), dataset=demo_dataset(), device="cpu",
                               extra_subscribers=subscribers)
    return code, out.getvalue()


def _assert_full_disk_end(code: int, out: str, err: str) -> None:
    assert code == EXIT_FAILED
    assert "Traceback" not in err and "Logging error" not in err and err.startswith("failed: ")
    assert "no space" in one_line(err)
    assert "cannot write" in out and "train.log" in out  # said once, as a warning line


def test_a_full_disk_under_train_log_prints_no_traceback(tiny_model_dir, tmp_path, mounts, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))

    def fill_after_step_2(event):
        if event.kind == "step_end" and event.step == 2:
            _fill(disk, leave=0)

    # No checkpoint before the end: the run goes on until train.log's lines have filled its last page.
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=40, checkpoint__every_steps=0,
                     logging__every_steps=1)
    code, out = _headless_run(config, disk / "run", fill_after_step_2)
    _assert_full_disk_end(code, out, capsys.readouterr().err)
    assert out.count("train.log") == 1


def test_an_injected_full_disk_under_train_log_prints_no_traceback(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from engine import run_logs

    full = []

    class Filling:
        def __init__(self, stream):
            self.stream = stream

        def _check(self):
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def write(self, text):
            self._check()
            return self.stream.write(text)

        def flush(self):
            self._check()
            self.stream.flush()

        def close(self):
            self.stream.close()
            self._check()

    real_open = run_logs.TrainLogHandler._open
    monkeypatch.setattr(run_logs.TrainLogHandler, "_open", lambda self: Filling(real_open(self)))
    monkeypatch.setattr(ckpt, "free_bytes", lambda folder: 0 if full else 2**40)

    def fill_after_step_2(event):
        if event.kind == "step_end" and event.step == 2:
            full.append(True)

    config = _config(tiny_model_dir, tmp_path, optim__max_steps=4, checkpoint__every_steps=0, logging__every_steps=1)
    code, out = _headless_run(config, tmp_path / "run", fill_after_step_2)
    _assert_full_disk_end(code, out, capsys.readouterr().err)


# ---- 8. a read-only run folder at the start ---------------------------------------------------------------------
def _assert_one_paragraph_refusal(code: int, err: str) -> None:
    assert code == EXIT_CONFIG
    assert "Traceback" not in err and err.startswith("error: ") and "\n\n" not in err.strip()
    assert "read-only" in one_line(err)


def test_a_read_only_run_folder_at_the_start_exits_2_with_one_paragraph(tiny_model_dir, tmp_path, capsys, mounts):
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=2)
    preset = save_config(config, tmp_path / "preset.toml", full=True)
    folder = tmp_path / "ro"
    _read_only_bind(mounts, folder)
    assert headless(preset, folder / "run") == EXIT_OK  # a finished run, then the disk turns read-only
    assert _mount("-o", "remount,ro,bind", str(folder)) == ""
    for run_dir in (folder / "run", folder / "new-run"):
        _assert_one_paragraph_refusal(headless(preset, run_dir), capsys.readouterr().err)


def test_an_injected_read_only_run_folder_at_the_start_exits_2(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from engine.train import run_lock

    def read_only(run_dir, what=""):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(run_dir) / run_lock.LOCK_FILENAME))

    monkeypatch.setattr(run_lock, "acquire_run_lock", read_only)
    preset = save_config(_config(tiny_model_dir, tmp_path, optim__max_steps=2), tmp_path / "preset.toml", full=True)
    _assert_one_paragraph_refusal(headless(preset, tmp_path / "run"), capsys.readouterr().err)


def test_a_run_folder_that_is_a_file_exits_2_saying_so(tiny_model_dir, tmp_path, capsys):
    preset = save_config(_config(tiny_model_dir, tmp_path, optim__max_steps=2), tmp_path / "preset.toml", full=True)
    (tmp_path / "run").write_text("not a folder")
    assert headless(preset, tmp_path / "run") == EXIT_CONFIG
    err = one_line(capsys.readouterr().err)
    assert "is a file, not a folder" in err and "check the disk" not in err
