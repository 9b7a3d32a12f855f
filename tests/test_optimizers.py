"""The optional optimizers (the `optimizers` extra: Lion, Prodigy, Schedule-Free) and the bitsandbytes 8-bit and
paged ones: each trains the tiny model and resumes bit for bit; schedule-free validates and exports at its
evaluation weights without changing the training; the CUDA-only ones are refused elsewhere before loading."""
from __future__ import annotations

import importlib.util
import threading

import pytest
import torch

from engine.config import with_value
from engine.models.lora import load_lora
from engine.runner import run
from engine.train import loop, validation
from engine.train.allowed import setting_problems
from engine.train.optim import BITSANDBYTES, OptimizerUnavailable, build_optimizer
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import demo_config

EXTRA = {"lion": "lion_pytorch", "prodigy": "prodigyopt", "schedulefree": "schedulefree"}
# Each optimizer's own settings: Prodigy's lr is a multiplier of the step it finds; schedule-free does its own
# schedule (no warmup, constant).
SETTINGS = {"lion": {"optim.lr": 1e-3}, "prodigy": {"optim.lr": 1.0}, "schedulefree": {"optim.lr": 1e-2}}


def _config(model_dir, tmp_path, optimizer: str, device: str = "cpu", **settings):
    config = demo_config(model_dir, tmp_path / "runs")
    base = {"optim.optimizer": optimizer, "optim.schedule": "constant", "optim.warmup_steps": 0,
            "optim.max_steps": 6, "checkpoint.every_steps": 3, **SETTINGS.get(optimizer, {}), **settings}
    if device == "cuda":
        base.update({"model.dtype": "bf16", "train.mixed_precision": "bf16"})
    for key, value in base.items():
        config = with_value(config, key, value)
    return config


def _train(config, run_dir, stop_at: int | None = None, device: str = "cpu"):
    stop = threading.Event()

    def stopper(event):
        if stop_at is not None and event.kind == "step_end" and event.step == stop_at:
            stop.set()

    return run(config, [stopper], stop, run_dir=run_dir, dataset=SyntheticLatentDataset(3), device=device)


def _resumes_bit_for_bit(config, tmp_path, device: str = "cpu"):
    ref = _train(config, tmp_path / "ref", device=device)
    assert ref.status == "completed", ref.reason
    assert _train(config, tmp_path / "resumed", stop_at=4, device=device).status == "stopped"
    resumed = _train(config, tmp_path / "resumed", device=device)
    assert resumed.status == "completed", resumed.reason
    a, meta = load_lora(ref.outputs["peft"])
    b, _ = load_lora(resumed.outputs["peft"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed run trained otherwise"
    return a, meta


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_optional_optimizer_trains_and_resumes_bit_for_bit(name, tiny_model_dir, tmp_path):
    if importlib.util.find_spec(EXTRA[name]) is None:
        pytest.fail(f"the dev extra installs {EXTRA[name]}: pip install -e '.[dev]'")
    lora, meta = _resumes_bit_for_bit(_config(tiny_model_dir, tmp_path, name), tmp_path)
    adamw = _train(_config(tiny_model_dir, tmp_path, "adamw", **{"optim.lr": SETTINGS[name]["optim.lr"]}),
                   tmp_path / "adamw")
    other, _ = load_lora(adamw.outputs["peft"])
    assert any(not torch.equal(lora[k], other[k]) for k in lora), f"{name} trained exactly as AdamW"
    assert meta["weights"] == ("schedulefree_eval" if name == "schedulefree" else "trained")


def test_schedulefree_validates_at_its_evaluation_weights_and_trains_on_unchanged(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    optimizers, modes = [], []
    real_build, real_eval = loop.build_optimizer, validation.evaluation_losses

    def recording_build(*args, **kwargs):
        optimizers.append(real_build(*args, **kwargs))
        return optimizers[-1]

    def recording_eval(*args, **kwargs):
        modes.append(optimizers[-1].param_groups[0]["train_mode"])
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(loop, "build_optimizer", recording_build)
    monkeypatch.setattr(validation, "evaluation_losses", recording_eval)
    plain = _train(_config(tiny_model_dir, tmp_path, "schedulefree"), tmp_path / "plain")
    validated = _train(_config(tiny_model_dir, tmp_path, "schedulefree", **{
        "validation.every_steps": 2, "validation.eval_loss.enabled": True, "validation.eval_loss.num_triples": 2}),
        tmp_path / "validated")
    assert plain.status == validated.status == "completed"
    assert modes == [False, False, False]  # steps 2, 4, 6: each in eval mode (x), never at the training point y
    assert optimizers[-1].param_groups[0]["train_mode"] is True  # and back in train mode after
    a, _ = load_lora(plain.outputs["peft"])
    b, _ = load_lora(validated.outputs["peft"])
    assert all(torch.equal(a[k], b[k]) for k in a), "validation changed the schedule-free training"


def test_missing_extra_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prodigyopt" else real(n, *a))
    with pytest.raises(OptimizerUnavailable, match=r"'prodigyopt'.*pip install 's2v-tui\[optimizers\]'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], "prodigy", 1.0)


_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("name", sorted(BITSANDBYTES))
def test_bitsandbytes_optimizer_trains_and_resumes(name, device, tiny_model_dir, tmp_path, tmp_path_factory):
    config = _config(tiny_model_dir, tmp_path, name, device=device, **{"optim.lr": 1e-3})
    assert setting_problems(config, 1, torch.device(device)) == []
    lora, _ = _resumes_bit_for_bit(config, tmp_path, device=device)
    assert all(torch.isfinite(v).all() for v in lora.values())
    other = _adamw_lora(tiny_model_dir, tmp_path_factory, device)
    assert any(not torch.equal(lora[k], other[k]) for k in lora)


_ADAMW: dict[str, dict] = {}


def _adamw_lora(tiny_model_dir, tmp_path_factory, device: str) -> dict:
    """The LoRA that plain AdamW trains on the same settings (once per device for all the 8-bit optimizers)."""
    if device not in _ADAMW:
        tmp = tmp_path_factory.mktemp(f"adamw-{device}")
        adamw = _train(_config(tiny_model_dir, tmp, "adamw", device=device, **{"optim.lr": 1e-3}), tmp / "adamw",
                       device=device)
        _ADAMW[device] = load_lora(adamw.outputs["peft"])[0]
    return _ADAMW[device]
