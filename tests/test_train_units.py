"""Pure pieces of the training engine: objective, schedules, optimizers, LoRA layouts, checkpoint files."""
from __future__ import annotations

import errno
import math

import pytest
import torch

from engine import fsio
from engine.train import checkpoint as ckpt
from engine.train.objective import (flow_loss, noisy_input, per_sample_mse, sample_sigmas, shift_sigmas,
                                    velocity_target)
from engine.train.optim import OptimizerUnavailable, build_optimizer, build_scheduler, lr_factor


# ---- objective --------------------------------------------------------------------------------------------
def test_shift_matches_the_formula_and_keeps_the_ends():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = shift_sigmas(s, 3.0)
    assert torch.allclose(out, 3 * s / (1 + 2 * s))
    assert out[0] == 0 and out[-1] == 1
    assert torch.equal(shift_sigmas(s, 1.0), s)


@pytest.mark.parametrize("mode", ["logit_normal", "uniform"])
def test_sigmas_are_seeded_and_in_range(mode):
    a = sample_sigmas(1000, torch.Generator().manual_seed(3), mode, 3.0)
    b = sample_sigmas(1000, torch.Generator().manual_seed(3), mode, 3.0)
    assert torch.equal(a, b)
    assert a.min() > 0 and a.max() < 1
    assert a.median() > 0.5  # shift 3 moves the mass towards high noise


def test_noisy_input_target_and_per_sample_loss():
    x0, eps = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    sig = torch.tensor([0.0, 1.0])
    xt = noisy_input(x0, eps, sig)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], eps[1])
    assert torch.equal(velocity_target(x0, eps), eps - x0)
    pred = torch.zeros_like(x0)
    pred[1] += 1.0
    target = torch.zeros_like(x0)
    per = per_sample_mse(pred, target)
    assert per.tolist() == [0.0, 1.0]
    assert flow_loss(pred, target).item() == 0.5  # mean over samples, not over all elements of a padded batch


# ---- optimizers and schedules ---------------------------------------------------------------------------------
def test_schedules_with_warmup():
    assert [lr_factor(s, "constant", 4, 20) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(4, "cosine", 4, 20) == 1.0 and lr_factor(20, "cosine", 4, 20) == pytest.approx(0.0)
    assert lr_factor(12, "cosine", 4, 20) == pytest.approx(0.5)
    assert lr_factor(12, "linear", 4, 20) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="constant, cosine, linear"):
        lr_factor(0, "exp", 0, 10)


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], "adamw", 1e-3)
    sched = build_scheduler(opt, "linear", 2, 10)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3 * 7 / 8])


@pytest.mark.parametrize("name,package", [("lion", "lion-pytorch"), ("prodigy", "prodigyopt"),
                                          ("schedulefree", "schedulefree")])
def test_missing_optimizer_package_is_named(name, package, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package.replace("-", "_") else real(n, *a))
    with pytest.raises(OptimizerUnavailable, match=rf"'{package}'.*pip install 's2v-tui\[optimizers\]'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], name, 1e-3)


def test_adamw8bit_keeps_its_state_in_8_bits():
    p = torch.nn.Parameter(torch.randn(8192))
    opt = build_optimizer([p], "adamw8bit", 1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8 and opt.state[p]["state2"].dtype == torch.uint8


# ---- checkpoint files -----------------------------------------------------------------------------------------
def _state(step: int) -> dict:
    return {"format_version": ckpt.FORMAT_VERSION, "step": step, "config_hash": "h", "lora": {"w": torch.full((4,), step * 1.0)},
            "optimizer": {}, "scheduler": {}, "rng": ckpt.capture_rng(), "data": {"cursor": step}}


def test_keep_last_n_and_newest_first(tmp_path):
    for step in (3, 6, 9, 12):
        ckpt.save_checkpoint(tmp_path, _state(step), keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [12, 9]
    state, path, skipped = ckpt.find_resume_state(tmp_path, "h")
    assert state["step"] == 12 and path.name == "step-00000012.pt" and not skipped


def test_truncated_checkpoint_is_skipped(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(3), keep_last=5)
    newest = ckpt.save_checkpoint(tmp_path, _state(6), keep_last=5)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    (ckpt.checkpoint_dir(tmp_path) / "step-00000009.pt").write_bytes(b"")  # a zero-length one too
    state, path, skipped = ckpt.find_resume_state(tmp_path, "h")
    assert state["step"] == 3 and torch.equal(state["lora"]["w"], torch.full((4,), 3.0))
    assert [s.path.name for s in skipped] == ["step-00000009.pt", "step-00000006.pt"]
    # The zero-length one has no digest record and fails to load; the truncated one fails its recorded digest.
    assert "unreadable" in skipped[0].reason and "bytes changed" in skipped[1].reason
    assert all("moved to" in s.reason for s in skipped)


def test_checkpoint_of_another_config_is_skipped(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(3), keep_last=5)
    state, _, skipped = ckpt.find_resume_state(tmp_path, "other")
    assert state is None and "another configuration" in skipped[0].reason


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _state(3), keep_last=1)
    real = fsio._write_all

    def full_disk(fd, data):
        real(fd, bytes(data)[:100])  # part of the file reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsio, "_write_all", full_disk)
    with pytest.raises(OSError) as info:
        ckpt.save_checkpoint(tmp_path, _state(6), keep_last=1)
    assert info.value.errno == errno.ENOSPC
    names = sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir())
    assert names == ["step-00000003.json", "step-00000003.pt"]  # no temp left, nothing of step 6
    state, _, _ = ckpt.find_resume_state(tmp_path, "h")
    assert state["step"] == 3


def test_rng_states_round_trip():
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(5)
    saved = ckpt.capture_rng({"g": gen})
    before = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    ckpt.restore_rng(saved, {"g": gen})
    after = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    assert before == after


def test_stale_temp_files_are_removed(tmp_path):
    folder = ckpt.checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / ".step-00000003.pt.abc.tmp").write_bytes(b"partial")
    ckpt.find_resume_state(tmp_path)
    assert not list(folder.iterdir())


def test_lr_factor_is_finite_everywhere():
    for schedule in ("constant", "cosine", "linear"):
        assert all(math.isfinite(lr_factor(s, schedule, 3, 10)) for s in range(15))


def test_step_timer_is_a_recent_median_without_the_warm_up():
    from engine.train.metrics import StepTimer

    timer = StepTimer(window=10, warmup=2)
    timer.add(40.0)  # compile
    assert timer.s_per_step == 40.0 and timer.eta(99) is None  # no ETA from a warm-up step
    timer.add(20.0)
    assert timer.eta(98) is None
    for seconds in (12.0, 11.8, 13.5, 12.2, 30.0):  # one slow step (a checkpoint) does not move a median
        timer.add(seconds)
    assert timer.s_per_step == 12.2
    assert timer.eta(10) == 122.0 and timer.eta(0) == 0.0
    for _ in range(10):
        timer.add(10.0)
    assert timer.s_per_step == 10.0  # only the last ten count
