"""[rollout] scheduled sampling on the tiny model (CPU): the input it trains on, its randomness, grads, resume."""
from __future__ import annotations

import threading

import pytest
import torch

from engine import config as cf
from engine.config import RolloutConfig, with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from engine.models.lora import load_lora
from engine.runner import run
from engine.train.objective import noisy_input, sample_sigmas, sigmas_to_timesteps
from engine.train.rollout import TIMESTEP, draw_offsets, rollout_input, training_input
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import demo_config


def _config(model_dir, tmp_path, **settings):
    config = with_value(demo_config(model_dir, tmp_path / "runs"), "optim.warmup_steps", 0)
    for key, value in settings.items():
        config = with_value(config, key.replace("__", "."), value)
    return config


def _losses(run_dir) -> dict[int, float]:
    return {e.step: e.loss for e in read_events(run_dir / EVENTS_FILENAME) if e.kind == "step_end"}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """The tiny model with its LoRA (B made non-zero, so the LoRA shows in the prediction) and one batch of 2."""
    from engine.runner import _load_model
    from engine.train.batches import BatchSource

    config = _config(tiny_model_dir, tmp_path_factory.mktemp("rollout"), optim__batch_size=2)
    model = _load_model(config, torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    model.train()
    source = BatchSource(SyntheticLatentDataset(2), 2, 0, 0.0, 0.0, torch.Generator().manual_seed(3))
    batch = source.next_batch()
    gen = torch.Generator().manual_seed(7)
    sigmas = sample_sigmas(2, gen)
    noise = torch.randn(batch.latents.shape, generator=gen)
    return model, batch, sigmas, noise


def _predict(model, batch, calls=None):
    def predict(x, s):
        if calls is not None:
            calls.append((x.clone(), s.clone(), torch.is_grad_enabled()))
        return model(x, sigmas_to_timesteps(s), batch.text, batch.ref_latents, batch.audio,
                     motion_latents=batch.motion_latents, drop_motion_frames=batch.drop_motion)
    return predict


def test_probability_zero_or_off_is_the_plain_noising_and_draws_nothing(tiny):
    model, batch, sigmas, noise = tiny
    x0 = batch.latents
    calls = []
    for config in (RolloutConfig(enabled=True, probability=0.0), RolloutConfig(enabled=False, probability=1.0)):
        gen = torch.Generator().manual_seed(11)
        x_t = training_input(config, gen, _predict(model, batch, calls), x0, noise, sigmas)
        assert torch.equal(x_t, noisy_input(x0, noise, sigmas))
        assert torch.equal(gen.get_state(), torch.Generator().manual_seed(11).get_state())
    assert calls == []


def test_one_step_rollout_is_the_hand_computed_euler_step_and_offset_zero_is_untouched(tiny):
    model, batch, sigmas, noise = tiny
    x0 = batch.latents
    calls = []
    x_t = rollout_input(_predict(model, batch, calls), x0, noise, sigmas, torch.tensor([1, 0]))

    start = sigmas + torch.tensor([TIMESTEP, 0.0])
    x_start = noisy_input(x0, noise, start)
    with torch.no_grad():
        velocity = _predict(model, batch)(x_start, start)
    by_hand = x_start[0] + (sigmas[0] - start[0]) * velocity[0]
    assert torch.equal(x_t[0], by_hand)
    assert not torch.equal(x_t[0], noisy_input(x0, noise, sigmas)[0])  # the model's own x_t, not the exact one
    assert torch.equal(x_t[1], noisy_input(x0, noise, sigmas)[1])  # offset 0: the plain noising, bit for bit
    assert len(calls) == 1 and not calls[0][2]  # one forward, without grad
    assert torch.equal(calls[0][1], torch.stack([start[0], sigmas[1]]))


def test_rollout_steps_one_timestep_at_a_time_and_lands_on_the_trained_sigma(tiny):
    model, batch, sigmas, noise = tiny
    x0 = batch.latents
    calls = []
    x_t = rollout_input(_predict(model, batch, calls), x0, noise, sigmas, torch.tensor([3, 1]))
    assert len(calls) == 3
    # Window 0: 1000 t' = 1000 t + 3, then +2, +1; window 1 is done after the first forward (kept at t).
    seen = torch.stack([s for _, s, _ in calls])
    assert torch.allclose(seen[:, 0], sigmas[0] + TIMESTEP * torch.tensor([3.0, 2.0, 1.0]), atol=1e-6)
    assert torch.allclose(seen[:, 1], torch.stack([sigmas[1] + TIMESTEP, sigmas[1], sigmas[1]]), atol=1e-6)
    x = noisy_input(x0, noise, sigmas + TIMESTEP * torch.tensor([3.0, 1.0]))
    with torch.no_grad():
        for j, (_, s, _) in enumerate(calls):
            following = torch.where(torch.tensor([3, 1]) > j + 1, s - TIMESTEP, sigmas)
            stepped = x + (following - s).view(-1, 1, 1, 1, 1) * _predict(model, batch)(x, s)
            x = torch.where(torch.tensor([True, j < 1]).view(-1, 1, 1, 1, 1), stepped, x)
    assert torch.allclose(x_t, x, atol=1e-6)


def test_start_is_capped_at_pure_noise():
    seen = []

    def predict(x, s):
        seen.append(s.clone())
        return torch.zeros_like(x)

    x0, noise = torch.zeros(1, 2), torch.ones(1, 2)
    x_t = rollout_input(predict, x0, noise, torch.tensor([0.999]), torch.tensor([4]))
    assert float(seen[0][0]) == 1.0  # 0.999 + 4/1000 capped at 1 ...
    assert torch.equal(x_t, noise)  # ... started from pure noise; a zero velocity keeps it there
    assert torch.allclose(torch.stack(seen)[:, 0], torch.tensor([1.0, 0.99975, 0.9995, 0.99925]))


def test_draws_come_from_the_generator_for_the_global_batch_and_every_part_runs_as_many_forwards():
    config = RolloutConfig(enabled=True, probability=0.5, max_step_offset=4)
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([0.2, 0.4, 0.6, 0.8])

    def counting(calls):
        def predict(x, s):  # per-window, so a slice gives exactly the whole batch's rows
            calls.append(len(s))
            return x * s.view(-1, 1) - 0.5
        return predict

    whole_calls = []
    whole = training_input(config, torch.Generator().manual_seed(1), counting(whole_calls), x0, noise, sigmas)
    expected = draw_offsets(4, torch.Generator().manual_seed(1), 0.5, 4)
    assert int(expected.max()) == len(whole_calls) > 0 and 0 < int((expected > 0).sum()) < 4
    for part in (slice(0, 2), slice(2, 4)):
        calls = []
        mine = training_input(config, torch.Generator().manual_seed(1), counting(calls), x0[part], noise[part],
                              sigmas[part], global_size=4, part=part)
        assert torch.equal(mine, whole[part])
        assert len(calls) == len(whole_calls)  # FSDP: every rank gathers each block as often
    plain = noisy_input(x0, noise, sigmas)
    assert all(torch.equal(whole[i], plain[i]) == (int(expected[i]) == 0) for i in range(4))


def test_the_loss_gradient_comes_from_the_training_forward_alone(tiny_model_dir, tmp_path):
    from engine.runner import _load_model
    from engine.train.loop import Trainer
    from engine.train.objective import flow_loss, velocity_target

    config = _config(tiny_model_dir, tmp_path, rollout__enabled=True, rollout__probability=1.0,
                     rollout__max_step_offset=3)
    model = _load_model(config, torch.device("cpu"))
    trainer = Trainer(config, model, SyntheticLatentDataset(2), tmp_path / "run", lambda e: None,
                      threading.Event(), torch.device("cpu"), config.config_hash())
    model.train()
    batch = trainer.batches.next_batch()
    before = trainer.noise_gen.get_state()
    trainer._forward_loss(batch).backward()
    grads = [p.grad.clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)

    # The same draws by hand: sigmas, noise, then the rollout's; its input fed as a constant.
    gen = torch.Generator()
    gen.set_state(before)
    t = config.train
    sigmas = sample_sigmas(1, gen, t.sigma_sampling, t.flow_shift, t.logit_mean, t.logit_std)
    noise = torch.randn(batch.latents.shape, generator=gen)
    offsets = draw_offsets(1, gen, 1.0, 3)
    calls = []
    x_t = rollout_input(_predict(model, batch, calls), batch.latents, noise, sigmas, offsets)
    assert torch.equal(gen.get_state(), trainer.noise_gen.get_state())
    assert not x_t.requires_grad and x_t.grad_fn is None
    assert all(p.grad is None for p in trainer.params)  # the rollout's forwards left no gradient
    assert not any(grad_on for _, _, grad_on in calls)
    assert int(offsets[0]) == len(calls) > 0
    flow_loss(_predict(model, batch)(x_t, sigmas), velocity_target(batch.latents, noise)).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(trainer.params, grads, strict=True))
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_runs_with_probability_zero_equal_runs_without_rollout(tiny_model_dir, tmp_path):
    base = _config(tiny_model_dir, tmp_path, optim__max_steps=3, checkpoint__every_steps=0)
    runs = {"off": base, "zero": with_value(with_value(base, "rollout.enabled", True), "rollout.probability", 0.0),
            "on": with_value(base, "rollout.enabled", True)}
    for name, config in runs.items():
        end = run(config, [], threading.Event(), run_dir=tmp_path / name, dataset=SyntheticLatentDataset(2),
                  device="cpu")
        assert end.status == "completed", end.reason
    assert _losses(tmp_path / "zero") == _losses(tmp_path / "off")
    assert _losses(tmp_path / "on") != _losses(tmp_path / "off")
    assert runs["on"].identity_hash() != runs["off"].identity_hash()  # a rollout run trains something else


def test_resumed_run_with_rollout_equals_an_uninterrupted_one(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=8, checkpoint__every_steps=0,
                     rollout__enabled=True, rollout__probability=0.5, rollout__max_step_offset=2)
    reference = run(config, [], threading.Event(), run_dir=tmp_path / "ref", dataset=SyntheticLatentDataset(2),
                    device="cpu")
    assert reference.status == "completed", reference.reason
    stop = threading.Event()

    def stop_at_5(event):
        if event.kind == "step_end" and event.step == 5:
            stop.set()

    stopped = run(config, [stop_at_5], stop, run_dir=tmp_path / "resumed", dataset=SyntheticLatentDataset(2),
                  device="cpu")
    assert stopped.status == "stopped" and "step 5" in stopped.reason
    resumed = run(config, [], threading.Event(), run_dir=tmp_path / "resumed", dataset=SyntheticLatentDataset(2),
                  device="cpu")
    assert resumed.status == "completed", resumed.reason
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "ref")
    a, _ = load_lora(reference.outputs["peft"])
    b, _ = load_lora(resumed.outputs["peft"])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("text", "key"), [
    ("[rollout]\nprobability = 1.5\n", "rollout.probability"),
    ("[rollout]\nprobability = -0.1\n", "rollout.probability"),
    ("[rollout]\nmax_step_offset = 0\n", "rollout.max_step_offset"),
    ("[rollout]\nmax_step_offset = 1001\n", "rollout.max_step_offset"),
])
def test_rollout_values_out_of_range_name_the_key_and_the_fix(tmp_path, text, key):
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(cf.BadValueError) as info:
        cf.load_config(path)
    assert info.value.key == key and str(path) in str(info.value) and info.value.fix


def test_rollout_defaults_are_off_with_the_seeds_basic_setup():
    r = cf.Config().rollout
    assert (r.enabled, r.probability, r.max_step_offset) == (False, 1.0, 10)
    assert cf.check_config(with_value(cf.Config(), "rollout.enabled", True)) == []


def _rollout_loss_and_grads(model, batch, sigmas, noise):
    from engine.train.objective import flow_loss, velocity_target

    params = [p for p in model.parameters() if p.requires_grad]
    config = RolloutConfig(enabled=True, probability=1.0, max_step_offset=3)
    predict = _predict(model, batch)
    x_t = training_input(config, torch.Generator().manual_seed(0), predict, batch.latents, noise, sigmas)
    loss = flow_loss(predict(x_t, sigmas), velocity_target(batch.latents, noise))
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return float(loss.detach()), grads


@pytest.mark.timeout(300)
def test_rollout_runs_through_streamed_blocks_offloaded_inputs_and_compiled_blocks(tiny_model_dir, tmp_path):
    """The no-grad forwards meet the 24gb preset's switches (block streaming, saved inputs in host slots, part of
    them kept in place) and compiled blocks: the same loss and gradients as the plainly checkpointed model, and
    the compiled blocks make their no-grad graphs once, not once per step. (On the CPU the streamer's copies are
    plain copies; dynamo's eager backend: tracing and guards without inductor's compile time.)"""
    from engine.runner import _load_model

    assert draw_offsets(1, torch.Generator().manual_seed(0), 1.0, 3).item() == 3  # three no-grad forwards
    config = _config(tiny_model_dir, tmp_path)
    plain = _load_model(config, torch.device("cpu"))
    streamed = _load_model(config, torch.device("cpu"))
    streamed.enable_gradient_checkpointing(1, offload_inputs=True, gpu_saved_inputs=1)
    streamed.enable_block_streaming(resident=1, device=torch.device("cpu"))
    source = SyntheticLatentDataset(1)
    from engine.train.batches import collate

    batch = collate([source[0]], [False], False)
    gen = torch.Generator().manual_seed(4)
    sigmas = sample_sigmas(1, gen)
    noise = torch.randn(batch.latents.shape, generator=gen)
    for model in (plain, streamed):
        model.train()
    ref_loss, ref_grads = _rollout_loss_and_grads(plain, batch, sigmas, noise)
    loss, grads = _rollout_loss_and_grads(streamed, batch, sigmas, noise)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    torch._dynamo.reset()
    streamed.compile_blocks(backend="eager")
    torch._dynamo.utils.counters.clear()
    first = _rollout_loss_and_grads(streamed, batch, sigmas, noise)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2
    again = _rollout_loss_and_grads(streamed, batch, sigmas, noise)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile per step
    assert first[0] == pytest.approx(ref_loss, rel=1e-6) and again[0] == first[0]
    torch._dynamo.reset()


def test_the_bench_counts_the_forwards_of_each_rolled_out_micro_batch():
    from bench.engine_step import RolloutForwards

    config = RolloutConfig(enabled=True, probability=1.0, max_step_offset=4)
    calls = []

    def predict(x, s):
        calls.append(1)
        return -x

    x0, noise, sigmas = torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0.3, 0.6])
    with RolloutForwards() as forwards:
        for seed in range(3):
            training_input(config, torch.Generator().manual_seed(seed), predict, x0, noise, sigmas)
    expected = [int(draw_offsets(2, torch.Generator().manual_seed(s), 1.0, 4).max()) for s in range(3)]
    assert forwards.counts == expected and sum(expected) == len(calls) > 0


@pytest.mark.timeout(600)
def test_two_fsdp_processes_with_rollout_train_the_lora_of_one_process_of_batch_2(tiny_model_dir, tmp_path):
    """FSDP2 gathers each block in every forward, so both ranks must run as many rollout forwards even where one
    rank's own windows need fewer (steps 1 and 3 below): with the global batch's draws they do, and the LoRA is
    that of one process training both windows."""
    from test_train_distributed import CLIPS, _launch, _lora_matches
    from test_train_distributed import _config as dist_config

    settings = {"rollout.enabled": True, "rollout.probability": 0.5, "rollout.max_step_offset": 3}
    assert dist_config(tiny_model_dir, tmp_path / "runs").train.seed == 42
    # The draws of the run (noise generator seed + 1; sigmas and noise of 2 windows, then the rollout's), to show
    # that the case is met: per step [rank 0's offset, rank 1's offset].
    gen, seen = torch.Generator().manual_seed(43), []
    for _ in range(4):
        sample_sigmas(2, gen)
        torch.randn((2, 16, 20, 8, 8), generator=gen)
        seen.append(draw_offsets(2, gen, 0.5, 3).tolist())
    assert seen == [[1, 0], [3, 3], [0, 3], [2, 2]]

    single = dist_config(tiny_model_dir, tmp_path / "runs", **{"optim.batch_size": 2, **settings})
    end = run(single, [], threading.Event(), run_dir=tmp_path / "single", dataset=SyntheticLatentDataset(CLIPS),
              device="cpu")
    assert end.status == "completed", end.reason
    config = dist_config(tiny_model_dir, tmp_path / "runs", **{"distributed.strategy": "fsdp", **settings})
    run_dir, _ = _launch(tmp_path, config, "fsdp")
    _lora_matches(run_dir, tmp_path / "single")


def test_the_config_form_shows_every_key_and_the_methods_on_their_own_tab():
    from engine.config import schema_fields
    from s2v_tui.app_logic.config_fields import topic_fields

    shown = {info.key: title for title, infos in topic_fields() for info in infos}
    assert {f.key for f in schema_fields()} == set(shown)  # nothing a user cannot reach from the app
    methods = [k for k in shown if k.split(".")[0] in ("rollout", "tread", "crepa")]
    assert {"rollout.max_step_offset", "tread.selection_ratio", "crepa.block_index"} <= set(methods)
    assert {shown[k] for k in methods} == {"Methods"}
