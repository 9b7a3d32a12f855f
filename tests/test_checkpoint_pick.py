"""Issue 16: picking a checkpoint of a run. The listing (engine.run_checkpoints), `s2v-tui sample --lora RUN@STEP`
and the checkpoint list of the Run and Runs screens, on a folder made by a real tiny run (CPU) with validation."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from engine.config import with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from engine.run_checkpoints import LoraReferenceError, checkpoint_lora, list_run_checkpoints
from engine.runner import run
from engine.train import checkpoint as ckpt
from engine.train.synthetic import SyntheticLatentDataset
from test_train_run import _config

SIZE = (80, 24)


@pytest.fixture(scope="module")
def validated(tiny_model_dir, tmp_path_factory):
    """A finished 4-step run, checkpoints and validation (one sample, the eval loss) every 2 steps:
    (config, run folder, the ValidationDone events by step, inputs folder)."""
    from PIL import Image

    from engine.data.synth import speech_audio, write_audio_file

    tmp = tmp_path_factory.mktemp("picked")
    Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8)).save(tmp / "face.png")
    write_audio_file(tmp / "speech.wav", speech_audio(2.0), 16000)
    config = _config(tiny_model_dir, tmp, optim__max_steps=4, checkpoint__every_steps=2, checkpoint__keep_last=3,
                     validation__every_steps=2, validation__steps=2, validation__eval_loss__enabled=True,
                     validation__eval_loss__num_triples=2)
    config = with_value(config, "validation.cases", [{"reference": str(tmp / "face.png"),
                                                      "audio": str(tmp / "speech.wav"), "prompt": "a person talks"}])
    end = run(config, [], threading.Event(), run_dir=tmp / "run", dataset=SyntheticLatentDataset(2), device="cpu")
    assert end.status == "completed", end.reason
    done = {e.step: e for e in read_events(tmp / "run" / EVENTS_FILENAME) if e.kind == "validation_done"}
    assert sorted(done) == [2, 4]
    return config, tmp / "run", done, tmp


def test_the_listing_has_each_checkpoints_step_losses_loras_and_samples(validated):
    config, run_dir, done, _ = validated
    listed = list_run_checkpoints(run_dir)
    assert [c.step for c in listed] == [4, 2]
    for c in listed:
        path = ckpt.checkpoint_path(run_dir, c.step)
        record = ckpt.read_digest(path)
        assert c.path == path and c.healthy and not c.problem and c.model == config.model.source
        assert c.loras == (("peft", ckpt.lora_path(path, "peft")), ("native", ckpt.lora_path(path, "native")))
        assert c.loss == record["loss_smooth"] and c.eval_loss == done[c.step].eval_loss is not None
        assert c.samples == tuple(Path(p) for p in done[c.step].sample_paths if f"step-{c.step:05d}" in p)
        assert c.samples and all(p.parent.name == f"step-{c.step:05d}" for p in c.samples)
        assert c.reference == f"{run_dir}@{c.step}"
    assert [c.reason for c in listed] == ["final", "interval"]


def test_a_damaged_or_missing_lora_file_shows_in_the_listing(validated, tmp_path):
    import shutil

    _, source, _, _ = validated
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    ckpt.lora_path(ckpt.checkpoint_path(run_dir, 2), "native").unlink()
    listed = {c.step: c for c in list_run_checkpoints(run_dir)}
    assert listed[4].healthy and not listed[2].healthy
    assert "step-00000002_native.safetensors is missing" in listed[2].problem
    assert [layout for layout, _ in listed[2].loras] == ["peft"]


def _sample(model_dir, inputs: Path, out: Path, *extra: str) -> int:
    from s2v_tui.commands.sample import main

    return main(["--model", str(model_dir), "--image", str(inputs / "face.png"), "--audio", str(inputs / "speech.wav"),
                 "--prompt", "a person talks", "--out", str(out), "--device", "cpu", "--steps", "2", "--size",
                 "64x64", "--max-chunks", "1", *extra])


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_sample_takes_a_checkpoint_reference_or_its_lora_file_in_either_layout(validated, tiny_model_dir, tmp_path,
                                                                             capsys):
    _, run_dir, _, inputs = validated
    native = ckpt.lora_path(ckpt.checkpoint_path(run_dir, 4), "native")
    renders = {}
    for name, extra in (("base", ()), ("reference", ("--lora", f"{run_dir}@4")),
                        ("path", ("--lora", str(run_dir / "checkpoints" / "step-00000004"))),
                        ("native", ("--lora", str(native)))):
        assert _sample(tiny_model_dir, inputs, tmp_path / f"{name}.mp4", *extra) == 0, capsys.readouterr().err
        renders[name] = _frames(tmp_path / f"{name}.mp4")
        err = capsys.readouterr().err
        if name in ("reference", "path"):
            assert f"with {ckpt.lora_path(ckpt.checkpoint_path(run_dir, 4), 'peft')}" in err
    # Both layouts of the checkpoint hold the same weights, and they change what the base model renders.
    assert np.array_equal(renders["reference"], renders["native"]) and np.array_equal(renders["reference"],
                                                                                     renders["path"])
    assert not np.array_equal(renders["reference"], renders["base"])


def test_sample_refuses_a_damaged_checkpoint_lora_and_a_step_without_checkpoint(validated, tiny_model_dir, tmp_path,
                                                                               capsys):
    import shutil

    _, source, _, inputs = validated
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    peft = ckpt.lora_path(ckpt.checkpoint_path(run_dir, 4), "peft")
    data = bytearray(peft.read_bytes())
    data[-10] ^= 0x01
    peft.write_bytes(bytes(data))
    assert _sample(tiny_model_dir, inputs, tmp_path / "x.mp4", "--lora", f"{run_dir}@4") == 2
    err = capsys.readouterr().err
    assert "SHA-256" in err and "step-00000004_native.safetensors instead" in err and not (tmp_path / "x.mp4").exists()
    assert _sample(tiny_model_dir, inputs, tmp_path / "x.mp4", "--lora", str(peft)) == 2  # the file itself too
    capsys.readouterr()
    assert _sample(tiny_model_dir, inputs, tmp_path / "x.mp4", "--lora", f"{run_dir}@3") == 2
    assert "no checkpoint of step 3; its checkpoints are at steps 2, 4" in capsys.readouterr().err
    with pytest.raises(LoraReferenceError, match="RUN_DIR@STEP"):
        checkpoint_lora(str(tmp_path / "nothing-here"))


# ---- the terminal app -------------------------------------------------------------------------------------------
@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _wait_for(pilot, condition, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout_s:.0f} s waiting for {what}"
        await pilot.pause(0.1)


def _rows(app) -> list[list[str]]:
    table = app.screen.query_one("#checkpoints-table")
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


@pytest.mark.anyio
async def test_the_runs_screen_lists_the_checkpoints_of_a_real_run(validated, tmp_path):
    from s2v_tui.app import build_app
    from s2v_tui.session import Session
    from s2v_tui.testing.fakes import fake_services

    config, run_dir, done, _ = validated
    app = build_app(fake_services(tmp_path, runs_dir=run_dir.parent), Session(config=config, attach_dir=run_dir),
                    start_mode="attach")
    copied = []
    app.copy_to_clipboard = copied.append
    async with app.run_test(size=SIZE) as pilot:
        await _wait_for(pilot, lambda: app.screen.query_one("#checkpoints-table").row_count == 2, 20,
                        "the checkpoint list")
        listed = app.screen.query_one("#checkpoints")
        assert listed.display and listed.region.height >= 4  # shown, inside the 80x24 screen
        rows = _rows(app)
        assert [r[0] for r in rows] == ["step 4", "step 2"]
        assert rows[0][2] == f"{done[4].eval_loss:.4g}" and rows[1][2] == f"{done[2].eval_loss:.4g}"
        assert rows[0][3] == "peft native" and rows[0][4] == "1" and rows[0][5] == ""
        detail = str(app.screen.query_one("#checkpoint-command").render())
        assert f"--lora {run_dir}@4" in detail and f"--model {config.model.source}" in detail
        assert "step-00000004_peft.safetensors" in str(app.screen.query_one("#checkpoint-lora").render())
        app.screen.query_one("#checkpoints-table").focus()
        await pilot.press("down", "enter")
        await pilot.pause()
        assert copied and f"--lora {run_dir}@2 " in copied[-1] and copied[-1].startswith("s2v-tui sample ")
        await pilot.press("ctrl+d")  # detach: the list goes with the run
        await _wait_for(pilot, lambda: not app.screen.query_one("#checkpoints").display, 5, "the list to hide")


@pytest.mark.anyio
async def test_the_run_screen_lists_the_checkpoints_of_the_run_it_trained(tiny_model_dir, tmp_path):
    from s2v_tui.app import build_app
    from s2v_tui.session import Session
    from s2v_tui.testing.fakes import fake_services

    def tiny_engine(config, subscribers, stop, run_dir=None):
        return run(config, subscribers, stop, run_dir=run_dir, dataset=SyntheticLatentDataset(2), device="cpu")

    config = _config(tiny_model_dir, tmp_path, optim__max_steps=4, checkpoint__every_steps=2,
                     data__datasets=[{"path": str(tmp_path / "clips")}])
    services = fake_services(tmp_path)
    services.runner = tiny_engine
    app = build_app(services, Session(config=config), start_mode="run")
    async with app.run_test(size=SIZE) as pilot:
        assert not app.screen.query_one("#checkpoints").display  # nothing to list before a run
        await pilot.press("s")
        await app.workers.wait_for_complete()
        await _wait_for(pilot, lambda: [r[0] for r in _rows(app)] == ["step 4", "step 2"], 20, "both checkpoints")
        assert app.screen.model.snapshot().status == "completed"
        assert f"--lora {config.run_path()}@4" in str(app.screen.query_one("#checkpoint-command").render())
