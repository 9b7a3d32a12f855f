"""optim.ema.update_every (the EMA averaged at every Nth optimizer update, resumed bit for bit) and
optim.grad_clip = "norm" | "value" (tiny model and plain tensors, CPU)."""
from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import pytest
import torch

from engine.config import Config, check_config, with_value
from engine.runner import run
from engine.train.distributed import SINGLE
from engine.train.ema import LoraEma
from engine.train.loop import Trainer
from engine.models.lora import load_lora
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import demo_config


def test_ema_averages_only_at_every_nth_update_and_keeps_its_count():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEma([p], decay=0.5, update_every=3)
    seen = []
    for step in range(1, 7):
        with torch.no_grad():
            p.fill_(float(step))
        seen.append((ema.after_optimizer_step(), ema.shadow[0][0].item()))
    # Averaged at updates 3 and 6 only: 0 -> 0.5 * 0 + 0.5 * 3 = 1.5 -> 0.5 * 1.5 + 0.5 * 6 = 3.75.
    assert seen == [(False, 0.0), (False, 0.0), (True, 1.5), (False, 1.5), (False, 1.5), (True, 3.75)]
    again = LoraEma([p], decay=0.5, update_every=3)
    again.load_state_dict(ema.state_dict())
    assert again.optimizer_steps == 6 and torch.equal(again.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError):
        LoraEma([p], decay=0.5, update_every=0)


def _config(model_dir, tmp_path, **settings):
    config = with_value(demo_config(model_dir, tmp_path / "runs"), "optim.warmup_steps", 0)
    for key, value in settings.items():
        config = with_value(config, key, value)
    return config


def test_ema_update_every_resumes_bit_for_bit(tiny_model_dir, tmp_path):
    settings = {"optim.max_steps": 10, "checkpoint.every_steps": 4, "optim.ema.enabled": True,
                "optim.ema.decay": 0.5, "optim.ema.update_every": 3}
    config = _config(tiny_model_dir, tmp_path, **settings)
    ref = run(config, [], threading.Event(), run_dir=tmp_path / "ref", dataset=SyntheticLatentDataset(2),
              device="cpu")
    assert ref.status == "completed", ref.reason
    stop = threading.Event()

    def stop_at_7(event):  # 7 is not a multiple of 3: the resumed EMA must know it has seen 7 updates
        if event.kind == "step_end" and event.step == 7:
            stop.set()

    stopped = run(config, [stop_at_7], stop, run_dir=tmp_path / "resumed", dataset=SyntheticLatentDataset(2),
                  device="cpu")
    assert stopped.status == "stopped"
    resumed = run(config, [], threading.Event(), run_dir=tmp_path / "resumed", dataset=SyntheticLatentDataset(2),
                  device="cpu")
    assert resumed.status == "completed", resumed.reason
    a, meta = load_lora(ref.outputs["peft"])
    b, _ = load_lora(resumed.outputs["peft"])
    assert meta["weights"] == "ema"
    assert all(torch.equal(a[k], b[k]) for k in a)
    every = run(with_value(config, "optim.ema.update_every", 1), [], threading.Event(), run_dir=tmp_path / "every",
                dataset=SyntheticLatentDataset(2), device="cpu")
    c, _ = load_lora(every.outputs["peft"])
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the interval changes the average


def _clip(config: Config, grads: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = Trainer._grad_norm(SimpleNamespace(cfg=config, params=params, trainable=params, dist=SINGLE))
    return norm, [p.grad for p in params]


def test_grad_clip_by_norm_and_by_value():
    grads = [torch.tensor([3.0, -0.5]), torch.tensor([-7.0])]
    full = math.sqrt(9 + 0.25 + 49)
    config = Config()
    norm, out = _clip(config, grads)  # the default: by norm, to 1
    assert norm == pytest.approx(full)
    assert torch.cat(out).norm().item() == pytest.approx(1.0, rel=1e-5)
    config = with_value(with_value(config, "optim.grad_clip", "value"), "optim.max_grad_value", 1.0)
    norm, out = _clip(config, grads)
    assert norm == pytest.approx(full)  # the logged norm is the unclipped one
    assert torch.equal(out[0], torch.tensor([1.0, -0.5])) and torch.equal(out[1], torch.tensor([-1.0]))
    norm, out = _clip(with_value(config, "optim.max_grad_value", 0.0), grads)
    assert all(torch.equal(o, g) for o, g in zip(out, grads))  # 0 = no clipping


def test_grad_clip_value_trains_and_the_rules_refuse_bad_values(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, **{"optim.max_steps": 2, "checkpoint.every_steps": 0})
    by_value = with_value(with_value(config, "optim.grad_clip", "value"), "optim.max_grad_value", 1e-4)
    a = run(by_value, [], threading.Event(), run_dir=tmp_path / "v", dataset=SyntheticLatentDataset(2), device="cpu")
    b = run(config, [], threading.Event(), run_dir=tmp_path / "n", dataset=SyntheticLatentDataset(2), device="cpu")
    assert a.status == b.status == "completed"
    wa, _ = load_lora(a.outputs["peft"])
    wb, _ = load_lora(b.outputs["peft"])
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    keys = lambda c: {e.key for e in check_config(c)}
    assert "optim.max_grad_value" in keys(with_value(config, "optim.max_grad_value", -1.0))
    assert "optim.ema.update_every" in keys(with_value(config, "optim.ema.update_every", 0))
