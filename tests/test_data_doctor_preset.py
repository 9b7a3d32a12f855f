"""`s2v-tui check PRESET.toml`: every [[data.datasets]] of a run config, checked with the run's own settings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.data import synth_broken
from s2v_tui.commands import check as check_cmd

# 64x48 test clips (synth_broken.GOOD_CLIP) at a matching training size, so that only the planted problem shows.
PRESET_HEAD = """\
[data]
resolution = [64, 48]
bucket = "fixed"
{extra}
[[data.datasets]]
path = "good"
repeats = 2
weight = 3.0

[[data.datasets]]
path = "bad"
"""


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> Path:
    """`good/` with two clean clips and `bad/` with a clip that has no audio track (blocking by default)."""
    root = tmp_path_factory.mktemp("preset")
    for i in range(2):
        synth_broken.good_clip(root / "good", f"ok_{i}", seed=i)
    synth_broken.good_clip(root / "bad", "mute", audio="none")
    return root


def _preset(root: Path, extra: str = "", name: str = "run") -> Path:
    path = root / f"{name}.toml"
    path.write_text(PRESET_HEAD.format(extra=extra), encoding="utf-8")
    return path


def _check(capsys, args: list[str]) -> tuple[int, dict | None, str]:
    code = check_cmd.main(args)
    out = capsys.readouterr()
    return code, (json.loads(out.out) if "--json" in args and out.out else None), out.err


def test_preset_checks_every_dataset_and_a_blocking_problem_fails(two_datasets, capsys, monkeypatch):
    # Relative dataset folders resolve against the working directory, as `s2v-tui cache` and `--run` do.
    monkeypatch.chdir(two_datasets)
    code, doc, _ = _check(capsys, [str(_preset(two_datasets)), "--json"])
    assert code == check_cmd.EXIT_PROBLEMS
    assert [(d["path"], d["repeats"], d["weight"]) for d in doc["datasets"]] == [("good", 2, 3.0), ("bad", 1, 1.0)]
    blocking = [p for c in doc["clips"] for p in c["problems"] if p["severity"] == "blocking"]
    assert [(p["code"], Path(p["path"]).resolve()) for p in blocking] == [
        ("no-audio-stream", (two_datasets / "bad" / "mute.mp4").resolve())]
    usable = [c for c in doc["clips"] if not any(p["severity"] == "blocking" for p in c["problems"])]
    assert len(usable) == 2 and doc["summary"]["usable_clips"] == 2
    assert all(c["plan"]["bucket"].startswith("64x48") for c in usable)  # the preset's fixed bucket
    assert doc["summary"]["windows_per_epoch"] == 2 * sum(len(c["plan"]["windows"]) for c in usable)  # repeats
    assert doc["preset"].endswith(".toml")


def test_the_preset_settings_decide_what_blocks(two_datasets, capsys, monkeypatch):
    monkeypatch.chdir(two_datasets)
    code, doc, _ = _check(capsys, [str(_preset(two_datasets, "allow_silent_audio = true\n", "silent_ok")), "--json"])
    assert code == check_cmd.EXIT_OK
    assert doc["summary"]["blocking"] == 0 and doc["summary"]["usable_clips"] == 3


def test_config_error_exits_2_naming_file_and_key(tmp_path, capsys):
    bad = tmp_path / "typo.toml"
    bad.write_text('[data]\nresolutoin = [64, 48]\n\n[[data.datasets]]\npath = "clips"\n', encoding="utf-8")
    code, doc, err = _check(capsys, [str(bad), "--json"])
    assert code == check_cmd.EXIT_USAGE and doc is None
    assert "typo.toml" in err and "data.resolutoin" in err and "fix" in err


def test_preset_without_datasets_or_with_data_options_is_a_usage_error(two_datasets, tmp_path, capsys):
    empty = tmp_path / "empty.toml"
    empty.write_text("[data]\nresolution = [64, 48]\n", encoding="utf-8")
    code, _, err = _check(capsys, [str(empty)])
    assert code == check_cmd.EXIT_USAGE and "data.datasets" in err
    code, _, err = _check(capsys, [str(_preset(two_datasets)), "--crop", "random"])
    assert code == check_cmd.EXIT_USAGE and "--crop" in err and "data.crop" in err
    code, _, err = _check(capsys, [str(_preset(two_datasets)), str(two_datasets / "good")])
    assert code == check_cmd.EXIT_USAGE and "not both" in err
    code, _, err = _check(capsys, [str(tmp_path / "missing.toml")])
    assert code == check_cmd.EXIT_USAGE and "missing.toml" in err
