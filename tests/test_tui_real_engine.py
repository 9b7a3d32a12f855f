"""End to end in the app: the real engine on the tiny model (CPU), started from the Run screen, real StepEnd
events on the panels, Stop with a checkpoint that is on disk afterwards. And the Presets screen with the
engine's real memory model over the shipped presets."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from engine.memory import GIB, predict
from engine.presets import preset_files
from s2v_tui.app import build_app
from s2v_tui.screens.dialogs import ConfirmStop
from s2v_tui.services import Services, engine_memory_predictor, engine_runner, find_repo_presets
from s2v_tui.session import Session, start_session
from s2v_tui.testing.fakes import fake_host_memory, fake_probe, tiny_run_config

SIZE = (80, 24)
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def one_torch_thread():
    # Two cores shared with the UI thread: one torch thread avoids OpenMP spin-waits fighting the event loop.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def real_services(tmp_path: Path) -> Services:
    return Services(probe=fake_probe(), runner=engine_runner(), predict_memory=engine_memory_predictor(),
                    host_memory=fake_host_memory, presets_dir=find_repo_presets(), runs_dir=tmp_path / "runs")


async def wait_for(pilot, condition, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout_s:.0f} s waiting for {what}"
        await pilot.pause(0.1)


async def test_real_engine_from_run_screen_stops_with_checkpoint(tmp_path, one_torch_thread):
    config = tiny_run_config(tmp_path)
    app = build_app(real_services(tmp_path), Session(config=config), start_mode="run")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        screen = app.screen
        assert app.training_active()
        await wait_for(pilot, lambda: screen.model.snapshot().step >= 5, 45, "five real training steps")
        first = screen.model.snapshot()
        assert first.status == "running" and first.total_steps == config.optim.max_steps
        assert first.losses and all(loss > 0 for loss in first.losses)
        await pilot.pause(0.6)  # one paint (2 Hz) later the panel shows the step
        assert f"/{config.optim.max_steps}" in str(screen.query_one("#speed").render())
        await pilot.press("x")
        assert isinstance(app.screen, ConfirmStop)
        await pilot.click("#answer-stop")
        await app.workers.wait_for_complete()
        await pilot.pause()
        snap = screen.model.snapshot()
        assert snap.status == "stopped" and snap.step >= first.step
        assert snap.checkpoint_path and Path(snap.checkpoint_path).exists(), snap.checkpoint_path
        assert snap.checkpoint_step == snap.step
        assert Path(snap.checkpoint_path).parent.parent == config.run_path()
        assert "run stopped" in str(screen.query_one("#run-hint").render())
        assert not app.training_active()


async def test_presets_screen_shows_the_memory_model(tmp_path):
    services = real_services(tmp_path)
    app = build_app(services, start_session(None, services.presets_dir), start_mode="presets", poll_hardware=True)
    presets = preset_files(services.presets_dir)  # base.toml is what they extend, not a row
    assert presets and all(p.name != "base.toml" for p in presets)
    async with app.run_test(size=SIZE) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        app.screen.repaint()
        table = app.screen.query_one("#presets")
        assert table.row_count == len(presets)
        for i, path in enumerate(presets):
            row = [str(cell) for cell in table.get_row_at(i)]
            vram, host = predict(app.screen._rows[i].config)
            assert row[2] == f"{vram / GIB:.1f} GiB" and row[3] == f"{host / GIB:.1f} GiB", (path, row)
        assert "no measurements" not in str(app.screen.query_one("#preset-note").render())
