"""A run refuses bad input before it touches anything: the message names the key, the file or folder, and the fix."""
from __future__ import annotations

import threading

from engine.config import Config, DatasetEntry
from engine.runner import run
from s2v_tui.commands.headless import EXIT_CONFIG, run_headless


def _empty_clips_config(tmp_path, source: str) -> Config:
    """A config of `source` over an empty clips folder, its runs under tmp_path, no TensorBoard."""
    (tmp_path / "clips").mkdir()
    config = Config()
    config.model.source = source
    config.data.datasets = [DatasetEntry(path=str(tmp_path / "clips"))]
    config.output.run_dir = str(tmp_path / "runs")
    config.logging.tensorboard = False
    return config


def test_missing_model_folder_fails_the_check_phase_before_any_cache_work(tmp_path):
    config = _empty_clips_config(tmp_path, str(tmp_path / "models" / "wan-s2v"))
    events = []
    end = run(config, [events.append], threading.Event(), device="cpu")
    assert end.status == "failed"
    assert "model.source" in end.reason and "does not exist" in end.reason and "owner/name" in end.reason
    assert [e.phase for e in events if e.kind == "phase_changed"] == ["check"]
    assert not config.cache_path().exists()


def test_command_line_output_name_cannot_leave_the_run_dir(tmp_path, capsys):
    preset = tmp_path / "run.toml"
    preset.write_text(f'[[data.datasets]]\npath = "{tmp_path / "clips"}"\n[output]\nrun_dir = "{tmp_path / "runs"}"\n',
                      encoding="utf-8")
    for name in ("../escaped", "", "/tmp/elsewhere"):
        assert run_headless(str(preset), overrides=[f"output.name={name!r}"]) == EXIT_CONFIG
        assert "output.name" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()


def test_empty_dataset_fails_the_run_naming_the_folder(tmp_path, tiny_model_dir, monkeypatch):
    from engine.models import components

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was loaded for an empty dataset")

    monkeypatch.setattr(components, "load_text_encoder", refuse)
    config = _empty_clips_config(tmp_path, str(tiny_model_dir))
    end = run(config, [], threading.Event(), device="cpu")
    assert end.status == "failed"
    assert str(tmp_path / "clips") in end.reason and "no usable training window" in end.reason
    assert "traceback" not in end.reason  # written for a person, as a config problem is


def test_model_folder_without_a_transformer_fails_the_check_phase_before_the_cache(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    shutil.rmtree(model / "transformer")
    config = _empty_clips_config(tmp_path, str(model))
    events = []
    end = run(config, [events.append], threading.Event(), device="cpu")
    assert end.status == "failed"
    assert "model.source" in end.reason and "config.json" in end.reason and str(model) in end.reason
    assert [e.phase for e in events if e.kind == "phase_changed"] == ["check"]
    assert not config.cache_path().exists()
