"""The engine end to end on the tiny model (CPU): run(), the loop, LoRA export, stop and resume in-process."""
from __future__ import annotations

import threading

import pytest
import torch

from engine.config import with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from engine.runner import run
from engine.models.lora import (LoraFileError, add_lora, check_native_keys, get_lora_state, load_lora,
                                native_reference_modules, to_native_layout)
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import DEMO_STEPS, demo_config, prepare




def demo_dataset():
    """Two in-memory windows shaped for the tiny model (the tests that do not need the cache use these)."""
    return SyntheticLatentDataset(2)


def _config(model_dir, tmp_path, **overrides):
    config = with_value(demo_config(model_dir, tmp_path / "runs"), "optim.warmup_steps", 0)  # runs of a few steps
    for key, value in overrides.items():
        config = with_value(config, key.replace("__", "."), value)
    return config


def step_file_names(*steps: int, formats=("native", "peft")) -> list[str]:
    """The files of the checkpoints of `steps`: the .pt, its digest record and its LoRA file in each layout."""
    tails = (".json", ".pt", *(f"_{layout}.safetensors" for layout in formats))
    return sorted(f"step-{step:08d}{tail}" for step in steps for tail in tails)


def _kinds(run_dir, kind):
    return [e for e in read_events(run_dir / EVENTS_FILENAME) if e.kind == kind]


def _losses(run_dir) -> dict[int, float]:
    # Last value per step: a resumed run repeats the steps after its checkpoint.
    return {e.step: e.loss for e in _kinds(run_dir, "step_end")}


def stop_then_resume(config, run_dir, at_step: int):
    """Run `config` into `run_dir`, stopped by its stop event after step `at_step`, then run it again (the resume);
    returns (the stopped run's outcome, the resumed one's)."""
    stop = threading.Event()

    def stop_at(event):
        if event.kind == "step_end" and event.step == at_step:
            stop.set()

    stopped = run(config, [stop_at], stop, run_dir=run_dir, dataset=demo_dataset(), device="cpu")
    resumed = run(config, [], threading.Event(), run_dir=run_dir, dataset=demo_dataset(), device="cpu")
    return stopped, resumed


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, tmp_path_factory):
    """The demo's job (its clips, cache, settings and step budget), once for the tests that read its results."""
    tmp = tmp_path_factory.mktemp("demo")
    config = prepare(tmp)
    events = []
    end = run(config, [events.append], threading.Event(), device="cpu")
    return config, config.run_path(), end, events


def test_demo_run_completes_with_every_event(demo_run):
    config, run_dir, end, events = demo_run
    assert end.status == "completed", end.reason
    kinds = [e.kind for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_ended"
    phases = [e.phase for e in events if e.kind == "phase_changed"]
    assert sorted(set(phases), key=phases.index) == ["check", "cache", "load", "train", "export", "done"]
    steps = [e for e in events if e.kind == "step_end"]
    assert [e.step for e in steps] == list(range(1, DEMO_STEPS + 1))
    last = steps[-1]
    assert last.s_per_step > 0 and last.samples_per_s > 0 and last.eta_s == 0 and last.host_rss_bytes > 0
    assert last.grad_norm is not None and 0 <= last.lr < config.optim.lr  # cosine schedule, near its end
    assert any(e.kind == "phase_changed" and e.phase == "cache" and "/" in e.detail for e in events)
    # The same events are in the run folder, with the frozen config and the log.
    assert [e.kind for e in read_events(run_dir / EVENTS_FILENAME)] == kinds
    assert (run_dir / "config.resolved.toml").exists()
    assert "exported the LoRA" in (run_dir / "train.log").read_text()


def test_loss_of_lora_overfitting_two_clips_halves(demo_run):
    _, run_dir, _, _ = demo_run
    losses = [loss for _, loss in sorted(_losses(run_dir).items())]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.5 * first, f"loss {first:.3f} -> {last:.3f} in {len(losses)} steps"


def test_both_export_layouts_reload_to_the_final_weights(demo_run, tiny_model_dir):
    config, run_dir, end, _ = demo_run
    from engine.train.checkpoint import find_resume_state

    final, _, _ = find_resume_state(run_dir)
    peft_state, peft_meta = load_lora(end.outputs["peft"])
    native_state, native_meta = load_lora(end.outputs["native"])
    assert peft_state.keys() == native_state.keys() == final["lora"].keys()
    for key, value in final["lora"].items():
        assert torch.equal(peft_state[key], value) and torch.equal(native_state[key], value)
    for meta in (peft_meta, native_meta):
        assert meta["base_model"] == config.model.source and meta["rank"] == "8" and float(meta["alpha"]) == 8.0
        assert meta["steps"] == str(DEMO_STEPS) and meta["config_hash"] == config.config_hash()
    assert peft_meta["layout"] == "peft" and native_meta["layout"] == "native"
    assert all(k.startswith("transformer.") for k in _file_keys(end.outputs["peft"]))
    keys = _file_keys(end.outputs["native"])
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert any(k.endswith(".self_attn.q.lora_down.weight") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)


def _file_keys(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def _tiny_model(model_dir, config):
    from engine.runner import _load_model

    return _load_model(config, torch.device("cpu"))


def test_only_lora_parameters_change(tiny_model_dir, tmp_path):
    from engine.train.loop import Trainer

    config = _config(tiny_model_dir, tmp_path, optim__max_steps=4, checkpoint__every_steps=0)
    model = _tiny_model(tiny_model_dir, config)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora = get_lora_state(model)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    trainer = Trainer(config, model, demo_dataset(), tmp_path / "run", lambda e: None, threading.Event(),
                      torch.device("cpu"), config.config_hash())
    assert trainer.run().status == "completed"
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    changed = get_lora_state(model)
    assert any(not torch.equal(changed[k], v) for k, v in lora.items() if ".lora_B." in k)


def test_native_keys_of_the_14b_model_map_onto_the_manifest():
    from engine.config import DEFAULT_LORA_TARGETS
    from engine.models.s2v_transformer import S2VTransformer3DModel

    with torch.device("meta"):
        model = S2VTransformer3DModel()
    modules = add_lora(model, 16, 16.0, 0.0, list(DEFAULT_LORA_TARGETS), "default", 0)
    assert len(modules) == 368
    state = {n.replace(".default.", "."): p for n, p in model.named_parameters() if ".lora_" in n}
    keys = to_native_layout(state, 16.0)
    assert len(keys) == 3 * 368
    check_native_keys(keys, native_reference_modules(model))  # the 14B manifest
    with pytest.raises(LoraFileError, match="name no module"):
        check_native_keys(["diffusion_model.blocks.0.attn1.to_q.lora_down.weight"], native_reference_modules(model))


def test_stop_event_checkpoints_and_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=10, checkpoint__every_steps=4)
    reference = run(config, [], threading.Event(), run_dir=tmp_path / "ref", dataset=demo_dataset(), device="cpu")
    assert reference.status == "completed"

    stopped, resumed = stop_then_resume(config, tmp_path / "resumed", 6)
    assert stopped.status == "stopped" and "step 6" in stopped.reason
    saved = _kinds(tmp_path / "resumed", "checkpoint_saved")
    assert [(e.step, e.reason) for e in saved] == [(4, "interval"), (6, "stop"), (8, "interval"), (10, "final")]
    assert resumed.status == "completed"
    starts = _kinds(tmp_path / "resumed", "run_started")
    assert [e.resumed_from_step for e in starts] == [0, 6]
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "ref")
    a, _ = load_lora(reference.outputs["peft"])
    b, _ = load_lora(resumed.outputs["peft"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=6, checkpoint__every_steps=3)
    run_dir = tmp_path / "run"
    assert run(config, [], None, run_dir=run_dir, dataset=demo_dataset(), device="cpu").status == "completed"
    newest = run_dir / "checkpoints" / "step-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    end = run(config, [], None, run_dir=run_dir, dataset=demo_dataset(), device="cpu")
    assert end.status == "completed"
    warnings = [e for e in _kinds(run_dir, "warning") if e.code == "checkpoint_skipped"]
    assert len(warnings) == 1 and "step-00000006.pt" in warnings[0].message
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 3


def test_full_disk_during_the_run_stops_at_once_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    import errno

    from engine.train import checkpoint as ckpt

    real = ckpt.atomic_write_bytes

    def fill_after_step_2(path, data):
        if "step-00000002" not in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", fill_after_step_2)
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=6, checkpoint__every_steps=2)
    run_dir = tmp_path / "run"
    end = run(config, [], None, run_dir=run_dir, dataset=demo_dataset(), device="cpu")
    # The write of step 4 fails: the run stops there, naming the cause and the checkpoint that stands.
    assert end.status == "failed" and "stopped at step 4" in end.reason
    assert "no space left" in end.reason and "step 2" in end.reason and "run the same command again" in end.reason
    assert max(e.step for e in _kinds(run_dir, "step_end")) == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == step_file_names(2)
    assert not list(run_dir.glob("*.safetensors"))  # no export of a run that did not finish

    monkeypatch.setattr(ckpt, "atomic_write_bytes", real)  # the disk has room again
    end = run(config, [], None, run_dir=run_dir, dataset=demo_dataset(), device="cpu")
    assert end.status == "completed", end.reason
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 2


def test_memory_switch_that_cannot_run_here_fails_loudly(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, memory__block_offload=True)
    end = run(config, [], None, run_dir=tmp_path / "run", dataset=demo_dataset(), device="cpu")
    assert end.status == "failed" and "memory.block_offload" in end.reason and "CUDA" in end.reason
    config = _config(tiny_model_dir, tmp_path, memory__base_weights="int8")
    end = run(config, [], None, run_dir=tmp_path / "run2", dataset=demo_dataset(), device="cpu")
    assert end.status == "failed" and "memory.base_weights" in end.reason


def test_host_offloaded_inputs_and_bf16_residual_train_on_cpu(tiny_model_dir, tmp_path):
    """The 48gb preset's switches run end to end (on the CPU the 'host' copies are plain copies)."""
    config = _config(tiny_model_dir, tmp_path, memory__offload_checkpoint_inputs=True,
                     memory__residual_dtype="bf16", memory__gradient_checkpointing=True,
                     optim__max_steps=3)
    end = run(config, [], None, run_dir=tmp_path / "run", dataset=demo_dataset(), device="cpu")
    assert end.status == "completed", end.reason


def test_nonfinite_steps_are_skipped_then_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    from engine.train import loop

    real = loop.flow_loss
    monkeypatch.setattr(loop, "flow_loss", lambda p, t: real(p, t) * float("nan"))
    config = _config(tiny_model_dir, tmp_path, train__nonfinite_max_in_a_row=3)
    end = run(config, [], None, run_dir=tmp_path / "run", dataset=demo_dataset(), device="cpu")
    assert end.status == "failed" and "3 steps in a row" in end.reason
    steps = _kinds(tmp_path / "run", "step_end")
    assert [e.skipped_nonfinite for e in steps] == [1, 2, 3]


def test_cached_dataset_run_resumes_exactly_after_a_stop(demo_run, tmp_path):
    config, run_dir, end, events = demo_run
    stop = threading.Event()

    def stop_at_50(event):
        if event.kind == "step_end" and event.step == 50:
            stop.set()

    other = tmp_path / "resumed"
    assert run(config, [stop_at_50], stop, run_dir=other, device="cpu").status == "stopped"
    assert run(config, [], None, run_dir=other, device="cpu").status == "completed"
    assert _losses(other) == _losses(run_dir)
    from engine.train.checkpoint import find_resume_state

    state, _, _ = find_resume_state(other)
    assert state["data"]["fingerprint"] and state["data"]["batch"] >= 0  # the cache sampler's position


def test_headless_plain_lines_and_exit_codes():
    import io

    from engine.events import RunEnded, StepEnd
    from s2v_tui.commands.headless import EXIT_FAILED, EXIT_OK, EXIT_STOPPED, PlainReporter, exit_code

    out = io.StringIO()
    report = PlainReporter(out, every=5)
    for step in range(1, 13):
        report(StepEnd(step=step, total_steps=12, epoch=0, loss=1.0, loss_smooth=1.0, lr=1e-4))
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == ["step 1/12", "step 5/12", "step 10/12",
                                                                            "step 12/12"]
    assert exit_code(RunEnded(status="completed")) == EXIT_OK == 0
    assert exit_code(RunEnded(status="stopped")) == EXIT_STOPPED
    assert exit_code(RunEnded(status="failed")) == EXIT_FAILED


def _board_scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    # A list per tag, not a dict by step: a step written twice must show up as two points.
    return {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_hold_the_losses_of_events_jsonl(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=4, checkpoint__every_steps=0,
                     logging__tensorboard=True)
    end = run(config, [], threading.Event(), run_dir=tmp_path / "run", dataset=demo_dataset(), device="cpu")
    assert end.status == "completed", end.reason
    scalars = _board_scalars(tmp_path / "run")
    steps = _kinds(tmp_path / "run", "step_end")
    for tag, field in (("train/loss", "loss"), ("train/loss_smooth", "loss_smooth"), ("train/lr", "lr")):
        assert [s for s, _ in scalars[tag]] == [e.step for e in steps]
        # TensorBoard stores float32: equal to the JSON floats to float32 precision.
        assert [v for _, v in scalars[tag]] == pytest.approx([getattr(e, field) for e in steps], rel=1e-6)
    assert [s for s, _ in scalars["train/grad_norm"]] == [s for s, _ in scalars["speed/s_per_step"]] == [1, 2, 3, 4]
    assert "memory/peak_alloc_gb" not in scalars  # not measurable on the CPU: left out, not plotted as 0


def test_tensorboard_eval_loss_and_a_resume_drop_the_steps_trained_again(tmp_path):
    pytest.importorskip("tensorboard")
    from engine.events import RunStarted, StepEnd, ValidationDone
    from engine.train.tensorboard import TensorBoardWriter

    def steps(first, last, loss):
        for step in range(first, last + 1):
            board(StepEnd(step=step, total_steps=4, epoch=0, loss=loss, loss_smooth=loss, lr=1e-4,
                          peak_alloc_bytes=2 * 10**9))

    board = TensorBoardWriter(tmp_path)
    board(RunStarted(run_dir=str(tmp_path), config_hash="h", total_steps=4))
    steps(1, 3, loss=1.0)
    board(ValidationDone(step=2, eval_loss=0.5))
    board.close()  # the process died after step 3; its last checkpoint was step 2
    board(RunStarted(run_dir=str(tmp_path), config_hash="h", total_steps=4, resumed_from_step=2))
    steps(3, 4, loss=2.0)
    board(ValidationDone(step=4, eval_loss=0.25))
    board.close()
    scalars = _board_scalars(tmp_path)
    assert scalars["train/loss"] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]
    assert scalars["eval/loss"] == [(2, 0.5), (4, 0.25)]
    assert scalars["memory/peak_alloc_gb"][-1] == (4, pytest.approx(2.0))


def test_host_ram_running_short_stops_with_a_checkpoint_that_resumes(tiny_model_dir, tmp_path, monkeypatch):
    """The guard reads the host's available memory (engine.gpu.host_memory); a low reading injected after step
    3 stops the run at the next step boundary with a checkpoint, before any kernel OOM kill could lose it."""
    import engine.gpu
    from engine.gpu import HostMemory

    gib, steps = 2**30, []
    monkeypatch.setattr(engine.gpu, "host_memory", lambda: HostMemory(
        64 * gib, (gib // 2) if len(steps) >= 3 else 32 * gib, 0, 0))
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=6, checkpoint__every_steps=0)
    run_dir = tmp_path / "run"
    end = run(config, [lambda e: steps.append(e) if e.kind == "step_end" else None], None, run_dir=run_dir,
              dataset=demo_dataset(), device="cpu")
    assert end.status == "failed" and "Host RAM ran short" in end.reason and "0.5 GiB available" in end.reason
    assert "resumes from the checkpoint written now" in end.reason
    saved = _kinds(run_dir, "checkpoint_saved")
    assert [(e.reason, e.step) for e in saved] == [("host_memory", len(steps))] and 3 <= len(steps) < 6

    monkeypatch.setattr(engine.gpu, "host_memory", lambda: HostMemory(64 * gib, 32 * gib, 0, 0))
    end = run(config, [], None, run_dir=run_dir, dataset=demo_dataset(), device="cpu")
    assert end.status == "completed", end.reason
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == len(steps)
