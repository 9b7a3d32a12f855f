"""wandb tracking with the real package in offline mode (WANDB_MODE=offline, its folder in tmp_path, no network):
the run's transaction log (run-ID.wandb) is read back record by record and checked against events.jsonl."""
from __future__ import annotations

import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from local_http import dead_port

from engine.config import with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME, RunWarning, StepEnd, TrackerStatus, ValidationDone
from engine.runner import run
from engine.train.synthetic import SyntheticLatentDataset
from engine.train.tensorboard import step_scalars
from s2v_tui.commands.demo import demo_config

pytest.importorskip("wandb")  # the dev extra installs it; `pip install -e .` alone does not

# The transaction log is a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then records
# in 32 KiB blocks, each chunk with a 7-byte header (CRC-32, length, type: 1 full, 2 first, 3 middle, 4 last)
# holding one serialized wandb Record protobuf. The package no longer ships a reader, so the test has its own.
_BLOCK, _HEADER = 32768, 7


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:_HEADER]) == (b":W&B", 0xBEE1, 0)
    records, pos, pending = [], _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # no room for a chunk header: the block is padded
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"corrupt record at {pos}"
        pos += _HEADER + length
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(records) -> dict[int, dict]:
    """step -> {key: value} of the logged rows; nested keys (a video's fields) are joined with '.'."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows[r.history.step.num] = {".".join(i.nested_key) or i.key: json.loads(i.value_json)
                                        for i in r.history.item}
    return rows


def offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted((wandb_dir / "wandb").glob("offline-run-*"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    return tmp_path / "wb"


@pytest.fixture(scope="module")
def validation_case(tmp_path_factory):
    from PIL import Image

    from engine.data.synth import speech_audio, write_audio_file

    tmp = tmp_path_factory.mktemp("case")
    Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8)).save(tmp / "face.png")
    write_audio_file(tmp / "speech.wav", speech_audio(2.0), 16000)
    return {"reference": str(tmp / "face.png"), "audio": str(tmp / "speech.wav"), "prompt": "a person talks",
            "seed": 3}


def _config(model_dir, tmp_path, **settings):
    config = with_value(demo_config(model_dir, tmp_path / "runs"), "optim.warmup_steps", 0)
    settings = {"optim.max_steps": 4, "checkpoint.every_steps": 2, "logging.tensorboard": False,
                "logging.wandb_project": "s2v-test", **settings}
    for key, value in settings.items():
        config = with_value(config, key, value)
    return config


def _run(config, run_dir):
    events = []
    end = run(config, [events.append], threading.Event(), run_dir=run_dir, dataset=SyntheticLatentDataset(2),
              device="cpu")
    return end, events


def test_offline_run_holds_the_scalars_the_config_and_the_samples_with_audio(tiny_model_dir, tmp_path, offline,
                                                                            validation_case):
    import av

    port = dead_port()  # the webhook fails at once: only its URL in the logged config matters here
    config = _config(tiny_model_dir, tmp_path, **{
        "validation.every_steps": 2, "validation.steps": 2, "validation.cases": [validation_case],
        "logging.webhooks": [f"http://127.0.0.1:{port}/api/webhooks/1/very-secret"]})
    run_dir = tmp_path / "run"
    end, events = _run(config, run_dir)
    assert end.status == "completed", end.reason
    [folder] = offline_runs(offline)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert folder.name.endswith(f"-{run_id}")
    records = wandb_records(folder / f"run-{run_id}.wandb")
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.run_id == run_id and run_record.project == "s2v-test" and run_record.display_name == "demo-lora"

    config_items = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert config_items["lora"]["rank"] == config.lora.rank and config_items["optim"]["max_steps"] == 4
    assert config_items["output"]["name"] == "demo-lora"
    assert config_items["logging"]["webhooks"] == [f"http://127.0.0.1:{port}/…"]  # the secret path stays home

    rows = history(records)
    steps = [e for e in read_events(run_dir / EVENTS_FILENAME) if isinstance(e, StepEnd)]
    assert sorted(rows) == [e.step for e in steps] == [1, 2, 3, 4]
    for event in steps:
        for tag, value in step_scalars(event).items():
            assert rows[event.step][tag] == pytest.approx(value, rel=1e-12), (event.step, tag)

    # Each validation's samples are in the row of its step, as videos whose file is the mp4 with its audio.
    done = [e for e in events if isinstance(e, ValidationDone)]
    assert [e.step for e in done] == [2, 4]
    assert rows[2]["samples/base/case-00._type"] == rows[2]["samples/case-00._type"] == "video-file"
    assert rows[4]["samples/case-00._type"] == "video-file" and "samples/base/case-00._type" not in rows[4]
    logged = folder / "files" / rows[4]["samples/case-00.path"]
    source = run_dir / "samples" / "step-00004" / "case-00.mp4"
    assert logged.read_bytes() == source.read_bytes()
    with av.open(str(logged)) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1

    status = [e for e in events if isinstance(e, TrackerStatus) and e.tracker == "wandb"]
    assert [s.state for s in status] == ["running", "finished"]
    assert f"run {run_id} offline in {folder}" in status[0].detail
    assert records[-1].WhichOneof("record_type") == "exit" and records[-1].exit.exit_code == 0


def test_a_resume_continues_the_same_wandb_run(tiny_model_dir, tmp_path, offline, monkeypatch):
    """Without WANDB_DIR wandb's files are in the run folder, whatever an earlier run of this process used."""
    monkeypatch.delenv("WANDB_DIR")
    run_dir = tmp_path / "run"
    stop = threading.Event()

    def stop_after_step_2(event):
        if isinstance(event, StepEnd) and event.step == 2:
            stop.set()

    config = _config(tiny_model_dir, tmp_path, **{"checkpoint.every_steps": 0})
    first = run(config, [stop_after_step_2], stop, run_dir=run_dir, dataset=SyntheticLatentDataset(2), device="cpu")
    assert first.status == "stopped", first.reason
    end, _ = _run(config, run_dir)
    assert end.status == "completed", end.reason
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    folders = offline_runs(run_dir)
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)  # `wandb sync` joins them
    logs = [wandb_records(f / f"run-{run_id}.wandb") for f in folders]
    for records in logs:
        run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run_record.run_id == run_id
    assert sorted(history(logs[0])) == [1, 2] and sorted(history(logs[1])) == [3, 4]
    assert logs[0][-1].exit.exit_code == 1  # the stopped process did not complete the run
    assert logs[1][-1].exit.exit_code == 0


def test_wandb_that_cannot_start_only_warns(tiny_model_dir, tmp_path, monkeypatch):
    """Online without credentials: never a login prompt (the terminal is the TUI's), a warning, and the run trains."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    end, events = _run(_config(tiny_model_dir, tmp_path), tmp_path / "run")
    assert end.status == "completed", end.reason
    warning = next(e for e in events if isinstance(e, RunWarning) and e.code == "wandb_failed")
    assert "not logged in to W&B" in warning.message and "training goes on" in warning.message
    assert [e.state for e in events if isinstance(e, TrackerStatus)] == ["failed"]


def test_a_missing_wandb_package_fails_the_check_naming_the_extra(tiny_model_dir, tmp_path, monkeypatch):
    import engine.train.trackers as trackers

    real = trackers._installed
    monkeypatch.setattr(trackers, "_installed", lambda name: False if name == "wandb" else real(name))
    end, events = _run(_config(tiny_model_dir, tmp_path), tmp_path / "run")
    assert end.status == "failed"
    assert "logging.wandb_project is set but the wandb package is not installed" in end.reason
    assert "pip install -e '.[wandb]'" in end.reason and "pip install 's2v-tui[wandb]'" in end.reason
    assert not any(isinstance(e, StepEnd) for e in events)
