"""Validation during training (tiny model, CPU): samples per step and once for the base model, the EMA's, the
ValidationDone events, and an evaluation loss that is the same number whenever it is recomputed."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from engine.config import with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from engine.runner import run
from engine.train.eval_loss import evaluation_loss, make_triples, quantile_sigmas
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import demo_config




def _lora_model(model_dir, seed=0):
    from engine.models.s2v_transformer import S2VTransformer3DModel
    from engine.models.lora import add_lora

    model = S2VTransformer3DModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    add_lora(model, 4, 4.0, 0.0, [r"blocks\.\d+\.attn1\.to_q", r"audio_injector\.injector\.\d+\.to_v"],
             "default", seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: give the LoRA weights that change the output
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def test_eval_triples_are_fixed_and_cover_the_sigma_range():
    a = make_triples(5, 8, seed=3, mode="logit_normal", shift=3.0)
    assert a == make_triples(5, 8, seed=3, mode="logit_normal", shift=3.0)
    assert sorted(t.sigma for t in a) == pytest.approx(quantile_sigmas(8, "logit_normal", 3.0))
    assert {t.index for t in a} == {0, 1, 2, 3, 4} and len({t.noise_seed for t in a}) == 8
    assert a != make_triples(5, 8, seed=4, mode="logit_normal", shift=3.0)


def test_eval_loss_is_identical_when_recomputed_with_the_same_weights(tiny_model_dir):
    from engine.models.lora import get_lora_state, set_lora_state

    data = SyntheticLatentDataset(3, latent_frames=4, seed=1)
    triples = make_triples(len(data), 4, seed=0, mode="logit_normal", shift=3.0)
    model = _lora_model(tiny_model_dir)
    model.train()
    first = evaluation_loss(model, data, triples, torch.device("cpu"))
    assert model.training  # restored after the evaluation
    assert evaluation_loss(model, data, triples, torch.device("cpu")) == first
    other = _lora_model(tiny_model_dir, seed=5)  # another model object, another init, then the same weights
    assert evaluation_loss(other, data, triples, torch.device("cpu")) != first
    set_lora_state(other, get_lora_state(model))
    assert evaluation_loss(other, data, triples, torch.device("cpu")) == first


@pytest.fixture(scope="module")
def validated_run(tiny_model_dir, tmp_path_factory):
    from PIL import Image

    from engine.data.synth import speech_audio, write_audio_file

    tmp = tmp_path_factory.mktemp("validated")
    Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8)).save(tmp / "face.png")
    write_audio_file(tmp / "speech.wav", speech_audio(2.0), 16000)
    config = demo_config(tiny_model_dir, tmp / "runs")
    settings = {
        "optim.max_steps": 3, "optim.warmup_steps": 0, "optim.ema.enabled": True, "optim.ema.decay": 0.5,
        "checkpoint.every_steps": 0, "validation.every_steps": 2, "validation.steps": 2,
        "validation.eval_loss.enabled": True, "validation.eval_loss.num_triples": 2,
        "validation.lora_scale": 0.75, "validation.lora_scales": [0.5, 1.5],
        "validation.cases": [{"reference": str(tmp / "face.png"), "audio": str(tmp / "speech.wav"),
                              "prompt": "a person talks", "seed": 11}],
    }
    for key, value in settings.items():
        config = with_value(config, key, value)
    events = []
    end = run(config, [events.append], threading.Event(), run_dir=tmp / "run",
              dataset=SyntheticLatentDataset(2), device="cpu")
    return tmp / "run", end, events


def test_validation_renders_each_step_the_ema_and_the_base_once(validated_run):
    run_dir, end, events = validated_run
    assert end.status == "completed", end.reason
    done = [e for e in events if e.kind == "validation_done"]
    assert [e.step for e in done] == [2, 3]  # every 2 steps and at the end
    names = [[p.split("samples/")[1] for p in e.sample_paths] for e in done]
    # The strength sweep renders one more file per scale, named with it.
    assert names[0] == ["base/case-00.mp4", "step-00002/case-00.mp4", "step-00002/case-00-scale-0.5.mp4",
                        "step-00002/case-00-scale-1.5.mp4", "step-00002/case-00-ema.mp4"]
    assert names[1] == ["step-00003/case-00.mp4", "step-00003/case-00-scale-0.5.mp4",
                        "step-00003/case-00-scale-1.5.mp4", "step-00003/case-00-ema.mp4"]  # the base only once
    import av

    with av.open(str(run_dir / "samples" / "step-00003" / "case-00.mp4")) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == 77 and len(c.streams.audio) == 1
    assert all(e.eval_loss is not None and np.isfinite(e.eval_loss) for e in done)
    assert [e.kind for e in read_events(run_dir / EVENTS_FILENAME)].count("validation_done") == 2
    assert "eval loss" in (run_dir / "train.log").read_text()
    phases = [e.phase for e in events if e.kind == "phase_changed"]
    assert phases.count("validate") == 2


def test_logged_eval_loss_is_recomputed_exactly_from_the_checkpoint(validated_run, tiny_model_dir):
    from engine.config import read_frozen_config
    from engine.train.checkpoint import find_resume_state
    from engine.models.lora import add_lora, set_lora_state
    from engine.models.s2v_transformer import S2VTransformer3DModel

    run_dir, _, events = validated_run
    config = read_frozen_config(run_dir)
    state, _, _ = find_resume_state(run_dir)
    assert state["step"] == 3
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    lo = config.lora
    add_lora(model, lo.rank, lo.alpha, lo.dropout, list(lo.targets), lo.init, config.train.seed)
    set_lora_state(model, state["lora"])
    t = config.train
    triples = make_triples(2, 2, t.seed, t.sigma_sampling, t.flow_shift, t.logit_mean, t.logit_std)
    again = evaluation_loss(model, SyntheticLatentDataset(2), triples, torch.device("cpu"))
    assert again == [e for e in events if e.kind == "validation_done"][-1].eval_loss


def test_validation_does_not_change_training(validated_run, tiny_model_dir, tmp_path):
    """The same run without validation trains the same losses (validation forks the RNG, draws nothing, and
    puts the LoRA strength of its sweep back exactly)."""
    run_dir, _, events = validated_run
    from engine.config import read_frozen_config

    config = with_value(read_frozen_config(run_dir), "validation.every_steps", 0)
    plain = []
    run(config, [plain.append], threading.Event(), run_dir=tmp_path / "plain", dataset=SyntheticLatentDataset(2),
        device="cpu")
    losses = [e.loss for e in events if e.kind == "step_end"]
    assert losses == [e.loss for e in plain if e.kind == "step_end"]
