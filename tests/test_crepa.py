"""CREPA on the tiny model (CPU): the loss term, where its gradient goes, the cached DINOv2 features, resume, export."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from engine.config import with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from engine.models.lora import load_lora
from engine.runner import run
from engine.train.crepa import (
    CrepaProjector,
    crepa_term,
    frame_weights,
    mean_similarity,
    pool_tokens,
)
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import demo_config

TINY_DINO_DIM = 16  # engine.models.tiny.TINY_DINOV2_DIM


def crepa_config(model_dir, tmp_path, **overrides):
    config = with_value(demo_config(model_dir, tmp_path / "runs"), "optim.warmup_steps", 0)
    settings = {"crepa.enabled": True, "crepa.block_index": 1, "crepa.encoder": str(model_dir / "dinov2"),
                **{k.replace("__", "."): v for k, v in overrides.items()}}
    for key, value in settings.items():
        config = with_value(config, key, value)
    return config


def crepa_dataset():
    return SyntheticLatentDataset(2, crepa_dim=TINY_DINO_DIM)


def _losses(run_dir) -> dict[int, float]:
    return {e.step: e.loss for e in read_events(run_dir / EVENTS_FILENAME) if e.kind == "step_end"}


# ---- the term alone -------------------------------------------------------------------------------------------


def test_similarity_weights_neighbours_by_the_decay():
    """Frame f of the projection equal to frame f of the features, orthogonal to every other frame: S(f) is
    1 / (sum of the neighbours' weights that exist for f), so the mean is known in closed form."""
    t, e = 3, 4
    eye = torch.eye(e)[:t].view(1, t, 1, 1, e)  # frame f is the unit vector e_f: orthogonal across frames
    decay = 2.0
    w1 = math.exp(-1 / decay)
    expected = (1 / (1 + w1) + 1 / (1 + 2 * w1) + 1 / (1 + w1)) / 3
    assert mean_similarity(eye, eye, 1, decay).item() == pytest.approx(expected)
    assert mean_similarity(eye, eye, 0, decay).item() == pytest.approx(1.0)
    assert mean_similarity(eye, -eye, 0, decay).item() == pytest.approx(-1.0)
    assert frame_weights(2, 1.0) == {k: math.exp(-abs(k)) for k in (-2, -1, 0, 1, 2)}
    # A distance past the window's length uses every frame there is, no more.
    assert mean_similarity(eye, eye, 5, decay).item() == pytest.approx(mean_similarity(eye, eye, 2, decay).item())


def test_pooling_averages_blocks_of_tokens_onto_the_feature_grid():
    hidden = torch.arange(16.0).view(1, 1, 4, 4, 1)
    pooled = pool_tokens(hidden, (2, 2))
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    odd = pool_tokens(torch.ones(1, 2, 3, 5, 7), (2, 3))  # odd token grids pool too (adaptive windows)
    assert odd.shape == (1, 2, 2, 3, 7) and torch.equal(odd, torch.ones_like(odd))


def test_projector_starts_the_same_for_a_seed_whatever_was_drawn_before():
    a = CrepaProjector(8, 4, seed=3)
    torch.randn(100)
    b = CrepaProjector(8, 4, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- the term on the tiny model -------------------------------------------------------------------------------


def _model_and_batch(tiny_model_dir, tmp_path, **overrides):
    from engine.runner import _load_model

    config = crepa_config(tiny_model_dir, tmp_path, **overrides)
    model = _load_model(config, torch.device("cpu"))
    sample = crepa_dataset()[0]
    return config, model, sample


def _forward(model, sample, sigma=0.6):
    x0 = sample["latents"][None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = (1 - sigma) * x0 + sigma * noise
    return model(x_t, torch.tensor([sigma * 1000]), sample["text"][None], sample["ref_latents"][None],
                 sample["audio"][None], motion_latents=sample["motion_latents"][None])


def test_keeping_the_hidden_state_changes_no_prediction(tiny_model_dir, tmp_path):
    _, model, sample = _model_and_batch(tiny_model_dir, tmp_path)
    plain = _forward(model, sample)
    model.capture_block = 1
    kept = _forward(model, sample)
    assert torch.equal(plain, kept)
    t, h, w = sample["latents"].shape[1], sample["latents"].shape[2] // 2, sample["latents"].shape[3] // 2
    assert model.captured.shape == (1, t, h, w, model.inner_dim)  # video tokens only, per latent frame
    with torch.no_grad():  # validation samples and the eval loss keep nothing
        _forward(model, sample)
    assert model.captured is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_crepa_gradient_reaches_the_lora_up_to_its_block_and_the_projector_only(tiny_model_dir, tmp_path,
                                                                                checkpointing):
    config, model, sample = _model_and_batch(tiny_model_dir, tmp_path, memory__gradient_checkpointing=checkpointing)
    term = crepa_term(config, model, torch.device("cpu"))
    _forward(model, sample)
    loss = term.loss(model.captured, sample["crepa"][None])
    assert 0.0 <= loss.item() <= 2 * config.crepa.weight
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    base = [n for n in grads if ".lora_" not in n]
    assert base and all(grads[n] is None for n in base)  # the frozen base gets no gradient at all
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)

    def reached(prefix):
        names = [n for n in grads if n.startswith(prefix) and ".lora_B." in n]
        assert names, prefix
        return [grads[n] is not None and bool(grads[n].abs().sum() > 0) for n in names]

    # Blocks 0 and 1 (and block 0's audio injector) make the hidden state of block 1; blocks 2, 3 and the
    # injector of block 3 come after it.
    for prefix in ("blocks.0.", "blocks.1.", "audio_injector.injector.0."):
        assert all(reached(prefix)), prefix
    for prefix in ("blocks.2.", "blocks.3.", "audio_injector.injector.1."):
        assert not any(reached(prefix)), prefix
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())


def test_block_index_past_the_model_is_refused(tiny_model_dir, tmp_path):
    from engine.train.allowed import setting_problems

    config = crepa_config(tiny_model_dir, tmp_path, crepa__block_index=4)  # the tiny model has blocks 0..3
    problems = setting_problems(config)
    assert any("crepa.block_index = 4" in p and "4 blocks" in p for p in problems)
    assert not setting_problems(with_value(config, "crepa.block_index", 3))
    end = run(config, [], None, run_dir=tmp_path / "run", dataset=crepa_dataset(), device="cpu")
    assert end.status == "failed" and "crepa.block_index" in end.reason
    fsdp = with_value(with_value(config, "crepa.block_index", 1), "distributed.strategy", "fsdp")
    assert any("FSDP" in p for p in setting_problems(fsdp, world_size=2))
    assert not setting_problems(with_value(fsdp, "distributed.strategy", "ddp"), world_size=2)


def test_bad_values_are_refused_by_key():
    from engine.config import Config, check_config

    config = Config()
    config.crepa.weight = -1.0
    config.crepa.temporal_decay = 0.0
    config.crepa.adjacent_distance = -1
    keys = [e.key for e in check_config(config)]
    assert {"crepa.weight", "crepa.temporal_decay", "crepa.adjacent_distance"} <= set(keys)
    config = Config()
    config.crepa.enabled = True
    config.crepa.encoder = "./no/such/dinov2"
    assert "crepa.encoder" in [e.key for e in check_config(config)]


def test_crepa_is_part_of_the_run_identity(tiny_model_dir, tmp_path):
    on = crepa_config(tiny_model_dir, tmp_path)
    assert on.identity_hash() != with_value(on, "crepa.enabled", False).identity_hash()
    assert on.identity_hash() != with_value(on, "crepa.weight", 0.25).identity_hash()


# ---- whole runs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "schedulefree"])  # schedule-free: checkpoints visit its eval point
def test_resumed_crepa_run_equals_an_uninterrupted_one_and_exports_no_projector(tiny_model_dir, tmp_path, optimizer):
    from engine.train.checkpoint import find_resume_state

    config = crepa_config(tiny_model_dir, tmp_path, optim__max_steps=8, checkpoint__every_steps=3,
                          optim__optimizer=optimizer, optim__schedule="constant")
    reference = run(config, [], threading.Event(), run_dir=tmp_path / "ref", dataset=crepa_dataset(), device="cpu")
    assert reference.status == "completed", reference.reason
    plain = run(with_value(config, "crepa.enabled", False), [], threading.Event(), run_dir=tmp_path / "plain",
                dataset=crepa_dataset(), device="cpu")
    assert _losses(tmp_path / "plain")[1] < _losses(tmp_path / "ref")[1]  # the term adds to the first loss

    stop = threading.Event()

    def stop_at_5(event):
        if event.kind == "step_end" and event.step == 5:
            stop.set()

    assert run(config, [stop_at_5], stop, run_dir=tmp_path / "resumed", dataset=crepa_dataset(),
               device="cpu").status == "stopped"
    resumed = run(config, [], threading.Event(), run_dir=tmp_path / "resumed", dataset=crepa_dataset(), device="cpu")
    assert resumed.status == "completed", resumed.reason
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "ref")
    assert "CREPA similarity" in (tmp_path / "ref" / "train.log").read_text()

    ref_state, _, _ = find_resume_state(tmp_path / "ref")
    res_state, _, _ = find_resume_state(tmp_path / "resumed")
    assert set(ref_state["crepa"]) == {"norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert all(torch.equal(ref_state["crepa"][k], res_state["crepa"][k]) for k in ref_state["crepa"])
    fresh = CrepaProjector(48, TINY_DINO_DIM, config.train.seed + 3).state_dict()
    assert not torch.equal(fresh["fc2.weight"], ref_state["crepa"]["fc2.weight"])  # the projector trained

    for layout, path in reference.outputs.items():
        weights, _ = load_lora(path)
        assert weights and all("lora" in k and "fc1" not in k and "crepa" not in k for k in weights), layout
    a, _ = load_lora(reference.outputs["peft"])
    b, _ = load_lora(resumed.outputs["peft"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    del plain


def test_a_crepa_checkpoint_without_a_projector_is_refused(tiny_model_dir, tmp_path):
    config = crepa_config(tiny_model_dir, tmp_path, optim__max_steps=2)
    from engine.runner import _load_model
    from engine.train.loop import Trainer

    model = _load_model(config, torch.device("cpu"))
    trainer = Trainer(config, model, crepa_dataset(), tmp_path / "run", lambda e: None, threading.Event(),
                      torch.device("cpu"), config.config_hash())
    state = trainer.state()
    state["crepa"] = {}
    with pytest.raises(ValueError, match="no CREPA projector"):
        Trainer(config, model, crepa_dataset(), tmp_path / "run", lambda e: None, threading.Event(),
                torch.device("cpu"), config.config_hash(), resume_state=state)


def test_checkpointed_and_offloaded_blocks_give_the_same_crepa_run(tiny_model_dir, tmp_path):
    """The kept hidden state is the block output whatever the recompute scheme: plain, checkpointed, and
    checkpointed with the saved inputs in host memory train the same losses."""
    losses = []
    for name, switches in {"plain": {"memory__gradient_checkpointing": False},
                           "ckpt": {"memory__gradient_checkpointing": True},
                           "host": {"memory__gradient_checkpointing": True,
                                    "memory__offload_checkpoint_inputs": True}}.items():
        config = crepa_config(tiny_model_dir, tmp_path, optim__max_steps=3, **switches)
        end = run(config, [], None, run_dir=tmp_path / name, dataset=crepa_dataset(), device="cpu")
        assert end.status == "completed", end.reason
        losses.append(_losses(tmp_path / name))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] == pytest.approx(losses[2], rel=1e-5)
