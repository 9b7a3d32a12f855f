"""Sampler schedules for validation and `s2v-tui sample` (validation.sigma_schedule = "shifted" | "beta",
validation.flow_shift) and the training shift train.flow_schedule_auto_shift: each changes the sigmas as its formula
says, and the validation, sampling and training paths use them."""
from __future__ import annotations

import math
import threading

import mpmath
import numpy as np
import pytest
import torch
from test_validation_options import inputs  # noqa: F401 - the reference image and speech fixture

from engine.config import check_config, with_value
from engine.infer import sampler, schedule
from engine.infer.schedule import beta_ppf, flow_sigmas, flow_timesteps, make_solver, schedule_sigmas
from engine.runner import run
from engine.train import loop
from engine.train.eval_loss import evaluation_loss, make_triples
from engine.train.objective import auto_shift, shift_sigmas, training_shift
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import demo_config


def _beta_cdf(x: float) -> float:  # an independent reference: mpmath's regularized incomplete beta
    return float(mpmath.betainc(0.6, 0.6, 0, x, regularized=True))


@pytest.mark.parametrize("q", [1e-4, 0.05, 0.25, 0.5, 0.6, 0.9, 0.999])
def test_beta_quantiles_invert_the_beta_cdf(q):
    assert _beta_cdf(beta_ppf(q)) == pytest.approx(q, abs=1e-12)
    assert beta_ppf(q) == pytest.approx(1 - beta_ppf(1 - q), abs=1e-12)  # Beta(0.6, 0.6) is symmetric


def test_beta_schedule_respaces_between_the_shifted_end_points():
    steps, shift = 12, 3.0
    shifted = schedule_sigmas(steps, shift)
    beta = schedule_sigmas(steps, shift, "beta")
    hi, lo = shifted[0], shifted[-1]
    assert beta[0] == pytest.approx(hi, abs=1e-15) and beta[-1] == pytest.approx(lo, abs=1e-15)
    for i, s in enumerate(beta):  # sigma_i = lo + F^-1(1 - i / (n - 1)) (hi - lo)
        assert _beta_cdf((s - lo) / (hi - lo)) == pytest.approx(1 - i / (steps - 1), abs=1e-9)
    assert np.all(np.diff(beta) < 0)
    gaps = -np.diff(beta)
    assert gaps[0] < gaps[steps // 2] and gaps[-1] < gaps[steps // 2]  # crowded at both ends
    assert not np.allclose(beta, shifted)


def test_flow_shift_sets_the_sampling_sigmas():
    base = schedule.base_sigmas(20)
    for shift in (1.0, 3.0, 5.0):
        expected = shift * base / (1 + (shift - 1) * base)
        assert torch.allclose(flow_sigmas(20, shift)[:-1], torch.from_numpy(expected).float())
        assert torch.equal(flow_timesteps(20, shift), torch.from_numpy(expected * 1000).to(torch.int64))
    assert not torch.equal(flow_sigmas(20, 5.0), flow_sigmas(20, 3.0))


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_both_solvers_walk_the_beta_schedule(solver):
    s = make_solver(solver, 10, 4.0, "beta")
    assert torch.equal(s.timesteps.cpu(), flow_timesteps(10, 4.0, "beta"))
    assert torch.allclose(s.sigmas.float(), flow_sigmas(10, 4.0, "beta"), atol=1e-7)
    official = make_solver(solver, 10, 4.0)
    assert not torch.equal(official.timesteps.cpu(), s.timesteps.cpu())


def _recording_solver(monkeypatch):
    calls = []
    real = sampler.make_solver

    def record(name, steps, shift=3.0, sigma_schedule="shifted"):
        calls.append((name, steps, shift, sigma_schedule))
        return real(name, steps, shift, sigma_schedule)

    monkeypatch.setattr(sampler, "make_solver", record)
    return calls


def test_validation_samples_with_its_own_schedule_and_shift(tiny_model_dir, inputs, tmp_path,  # noqa: F811
                                                            monkeypatch):
    calls = _recording_solver(monkeypatch)
    config = demo_config(tiny_model_dir, tmp_path / "runs")
    settings = {"optim.max_steps": 2, "optim.warmup_steps": 0, "validation.every_steps": 2, "validation.steps": 2,
                "validation.solver": "euler", "validation.sigma_schedule": "beta", "validation.flow_shift": 5.0,
                "validation.cases": [{"reference": str(inputs / "face.png"), "audio": str(inputs / "long.wav"),
                                      "prompt": "a man talks"}]}
    for key, value in settings.items():
        config = with_value(config, key, value)
    assert config.train.flow_shift == 3.0
    end = run(config, [], threading.Event(), run_dir=tmp_path / "run", dataset=SyntheticLatentDataset(2),
              device="cpu")
    assert end.status == "completed", end.reason
    assert calls and set(calls) == {("euler", 2, 5.0, "beta")}  # the base and the LoRA samples alike


def test_validation_schedule_keys_may_change_on_resume_and_are_checked():
    from engine.config import Config

    a, b = Config(), Config()
    b.validation.sigma_schedule, b.validation.flow_shift = "beta", 5.0
    assert a.identity_hash() == b.identity_hash()  # they shape the samples, never the training
    b.validation.flow_shift = 0.0
    assert "validation.flow_shift" in {e.key for e in check_config(b)}


def test_sample_command_takes_the_schedule(tiny_model_dir, inputs, tmp_path, monkeypatch, capsys):  # noqa: F811
    from s2v_tui.commands.sample import main

    calls = _recording_solver(monkeypatch)
    common = ["--model", str(tiny_model_dir), "--image", str(inputs / "face.png"), "--audio",
              str(inputs / "long.wav"), "--prompt", "a man talks", "--device", "cpu", "--steps", "3", "--size",
              "64x64", "--max-chunks", "1", "--solver", "euler", "--shift", "4"]
    assert main([*common, "--out", str(tmp_path / "a.mp4")]) == 0, capsys.readouterr().err
    assert main([*common, "--sigma-schedule", "beta", "--out", str(tmp_path / "b.mp4")]) == 0
    assert calls == [("euler", 3, 4.0, "shifted"), ("euler", 3, 4.0, "beta")]
    assert (tmp_path / "a.mp4").read_bytes() != (tmp_path / "b.mp4").read_bytes()


def test_auto_shift_formula():
    # 832x480: latents 104x60, 1560 tokens of 2x2 patches per frame.
    assert auto_shift(60, 104) == pytest.approx(math.exp(0.5 + 0.65 * (1560 - 256) / 3840))
    assert auto_shift(60, 104) == pytest.approx(2.0559, abs=1e-4)
    assert auto_shift(32, 32) == pytest.approx(math.exp(0.5))  # 256 tokens: mu = base_shift
    assert auto_shift(128, 128) == pytest.approx(math.exp(1.15))  # 4096 tokens: mu = max_shift
    from engine.config import Config

    t = Config().train
    assert training_shift(t, (1, 16, 20, 60, 104)) == 3.0
    t.flow_schedule_auto_shift = True
    assert training_shift(t, (1, 16, 20, 60, 104)) == auto_shift(60, 104)


def test_auto_shift_drives_the_training_sigmas(tiny_model_dir, tmp_path, monkeypatch):
    shifts = []
    real = loop.sample_sigmas

    def record(batch, generator, mode="logit_normal", shift=3.0, *args):
        shifts.append(shift)
        return real(batch, generator, mode, shift, *args)

    monkeypatch.setattr(loop, "sample_sigmas", record)
    config = with_value(with_value(demo_config(tiny_model_dir, tmp_path / "runs"), "optim.max_steps", 3),
                        "optim.warmup_steps", 0)
    for auto, run_dir in ((False, "fixed"), (True, "auto")):
        end = run(with_value(config, "train.flow_schedule_auto_shift", auto), [], threading.Event(),
                  run_dir=tmp_path / run_dir, dataset=SyntheticLatentDataset(2), device="cpu")
        assert end.status == "completed", end.reason
    per_step = len(shifts) // 2
    assert shifts[:per_step] == [3.0] * per_step
    assert shifts[per_step:] == [auto_shift(8, 8)] * per_step  # the synthetic latents are 8x8
    refused = with_value(with_value(config, "train.flow_schedule_auto_shift", True), "train.flow_shift", 5.0)
    assert "train.flow_schedule_auto_shift" in {e.key for e in check_config(refused)}


def test_eval_loss_shifts_each_window_by_its_size_under_auto_shift(tiny_model_dir):
    from engine.infer import S2VPipeline

    model = S2VPipeline.load(tiny_model_dir, "cpu", "fp32").model
    data = SyntheticLatentDataset(2)
    raw = make_triples(len(data), 3, seed=1, mode="logit_normal", shift=1.0)
    k = auto_shift(8, 8)
    shifted = [type(t)(t.index, float(shift_sigmas(torch.tensor([t.sigma]), k)), t.noise_seed) for t in raw]
    auto = evaluation_loss(model, data, raw, torch.device("cpu"), shift_by_size=True)
    assert auto == pytest.approx(evaluation_loss(model, data, shifted, torch.device("cpu")), rel=1e-5)
    assert auto != pytest.approx(evaluation_loss(model, data, raw, torch.device("cpu")), rel=1e-5)
