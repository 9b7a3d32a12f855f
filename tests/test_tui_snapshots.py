"""SVG snapshots of every screen at 80x24 and 120x40 (Textual pinned in pyproject).

Deterministic by construction: fake NVML and host memory, the fixed dataset report, the fake engine with a
fixed clock, relative paths under a temporary working folder, and UTC for the log's clock times.
Regenerate after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from engine.config import with_value
from s2v_tui.app import build_app
from s2v_tui.session import start_session
from s2v_tui.testing.fake_engine import FakeEngine, fixed_clock
from s2v_tui.testing.fakes import fake_services, fixed_doctor, measured_predictor

REPO = Path(__file__).resolve().parents[1]
SIZES = [(80, 24), (120, 40)]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    (tmp_path / "presets").mkdir()
    shutil.copy(REPO / "presets" / "base.toml", tmp_path / "presets" / "base.toml")
    yield tmp_path
    monkeypatch.undo()
    time.tzset()


def snapshot_app(start_mode: str, blocking: bool = True, predict=None):
    services = fake_services(Path("."), presets_dir=Path("presets"), runs_dir=Path("runs"), gpus=2,
                             engine=FakeEngine(steps=40, clock=fixed_clock(), checkpoint_every=20, host="gpu-box"),
                             doctor=fixed_doctor(blocking=blocking), predict=predict)
    session = start_session(None, Path("presets"))
    session.config = with_value(session.config, "data.datasets", [{"path": "clips"}])
    return build_app(services, session, start_mode=start_mode, poll_hardware=True)


async def _quiet(pilot) -> None:
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dataset_screen(snap_compare, workdir, size):
    async def run_before(pilot):
        await pilot.press("ctrl+r")
        await _quiet(pilot)

    assert snap_compare(snapshot_app("dataset"), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_presets_screen(snap_compare, workdir, size):
    # Two presets with fixed needs (GiB of GPU memory, GiB of host RAM), told apart by block_offload; base.toml
    # beside them is not a preset and has no row.
    (workdir / "presets" / "24gb.toml").write_text('extends = "base.toml"\n[memory]\nblock_offload = true\n')
    (workdir / "presets" / "80gb.toml").write_text('extends = "base.toml"\n')
    predict = measured_predictor({"bf16/True": (16.0, 68.0), "bf16/False": (70.0, 6.0)})

    async def run_before(pilot):
        await _quiet(pilot)
        pilot.app.screen.repaint()
        await pilot.pause()

    assert snap_compare(snapshot_app("presets", predict=predict), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_config_screen(snap_compare, workdir, size):
    async def run_before(pilot):
        await _quiet(pilot)

    assert snap_compare(snapshot_app("config"), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_run_screen(snap_compare, workdir, size):
    async def run_before(pilot):
        await _quiet(pilot)
        await pilot.press("s")
        await _quiet(pilot)
        pilot.app.screen.repaint()
        await pilot.pause()

    assert snap_compare(snapshot_app("run"), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_runs_screen(snap_compare, workdir, size):
    async def run_before(pilot):
        await _quiet(pilot)

    FakeEngine(steps=12, clock=fixed_clock(), host="gpu-box")(snapshot_app("run").session.config, [],
                                              __import__("threading").Event(), run_dir=Path("runs/earlier"))
    assert snap_compare(snapshot_app("attach"), terminal_size=size, run_before=run_before)
