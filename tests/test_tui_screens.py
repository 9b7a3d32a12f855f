"""Pilot tests of each screen at 80x24 with fake NVML, a fixed host reading and the fast fake engine."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config, with_value
from engine.gpu_fake import GIB
from engine.train.allowed import SAVE_ATTENTION_CONFLICT, setting_problems
from s2v_tui.app import build_app
from s2v_tui.palette import S2VCommands
from s2v_tui.testing.fake_engine import FakeEngine, fixed_clock
from s2v_tui.screens.dialogs import ConfirmQuit, ConfirmStop, ErrorReport
from s2v_tui.session import start_session
from s2v_tui.services import MemoryNeed
from s2v_tui.testing.fakes import fake_services, fixed_doctor

REPO = Path(__file__).resolve().parents[1]
SIZE = (80, 24)
pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs the async tests (no pytest-asyncio needed)


def make_app(tmp_path: Path, presets_dir: Path, *, datasets: bool = True, start_mode: str = "dataset", **kw):
    services = fake_services(tmp_path, presets_dir=presets_dir, **kw)
    session = start_session(None, presets_dir)
    session.config = with_value(session.config, "output.run_dir", str(tmp_path / "runs"))
    if datasets:
        session.config = with_value(session.config, "data.datasets", [{"path": str(tmp_path / "clips")}])
    return build_app(services, session, start_mode=start_mode)


async def settle(app, pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()


# -- Dataset ---------------------------------------------------------------------------------------------------

async def test_dataset_blocking_problem_disables_train(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, doctor=fixed_doctor(blocking=True))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        screen = app.screen
        assert screen.query_one("#clips").row_count == 4
        assert "1 blocking" in str(screen.query_one("#summary").render())
        problems = str(screen.query_one("#problems").render())
        assert "too-few-frames" in problems and "fix: use clips of at least 5 s" in problems
        assert screen.query_one("#train").disabled
        await pilot.press("ctrl+t")  # refused: nothing starts
        await settle(app, pilot)
        assert app.screen is screen and not app.training_active()


async def test_dataset_clean_check_starts_training(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, doctor=fixed_doctor(blocking=False))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert not app.screen.query_one("#train").disabled
        await pilot.click("#train")
        await settle(app, pilot)
        await pilot.pause()
        assert type(app.screen).__name__ == "RunScreen"
        snap = app.screen.model.snapshot()
        assert snap.status == "completed" and snap.step == 20


async def test_dataset_real_doctor_on_synthetic_clip(tmp_path, presets_dir):
    from engine.data.synth import make_talking_clip

    make_talking_clip(tmp_path / "clips", "tiny", size=(64, 48), duration_s=1.0, use_espeak=False)
    app = make_app(tmp_path, presets_dir)  # the real doctor
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        problems = str(app.screen.query_one("#problems").render())
        assert "tiny-resolution" in problems and "too-few-frames" in problems
        assert app.screen.query_one("#train").disabled
        assert app.session.dataset_blocking


# -- Presets ---------------------------------------------------------------------------------------------------

async def test_presets_show_gpus_and_not_measured(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, gpus=2, start_mode="presets")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.screen.repaint()
        gpus = app.screen.query_one("#gpus")
        assert gpus.row_count == 2
        assert [str(c) for c in gpus.get_row_at(1)][:5] == ["1", "NVIDIA H100 80GB HBM3", "80.0", "22.0", "58.0"]
        presets = app.screen.query_one("#presets")
        assert presets.row_count == 2  # 24gb and 80gb: base.toml is what presets extend, not a preset
        assert [str(presets.get_row_at(i)[1]) for i in range(2)] == ["24gb", "80gb"]
        assert all("not measured yet" in str(presets.get_row_at(i)[2]) for i in range(2))
        assert "nothing is recommended" in str(app.screen.query_one("#preset-note").render())


async def test_presets_no_driver_takes_typed_vram_and_recommends(tmp_path, presets_dir):
    needs = {"24gb": MemoryNeed(22 * GIB, 64 * GIB), "80gb": MemoryNeed(70 * GIB, 32 * GIB)}

    def predict(config):  # keyed on the switches that tell the two presets apart
        if config.memory.block_offload:
            return needs["24gb"]
        if not config.memory.gradient_checkpointing:
            return needs["80gb"]
        return None

    app = make_app(tmp_path, presets_dir, no_driver=True, predict=predict, start_mode="presets")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.screen.repaint()
        assert "No GPU readings: no NVIDIA driver" in str(app.screen.query_one("#no-driver").render())
        assert not app.screen.query_one("#gpus").display
        app.screen.query_one("#vram").focus()
        await pilot.press("4", "8")
        await pilot.pause()
        rows = {str(r[1]): r for r in (app.screen.query_one("#presets").get_row_at(i) for i in range(2))}
        assert any("24gb (recommended)" in name for name in rows)
        app.session.vram_override_gb = 80
        app.screen._painted_version = -1
        app.screen.repaint()
        names = [str(app.screen.query_one("#presets").get_row_at(i)[1]) for i in range(2)]
        assert any("80gb (recommended)" in name for name in names)
        assert not any("24gb (recommended)" in name for name in names)


async def test_presets_host_ram_field_follows_the_live_reading_until_typed(tmp_path, presets_dir):
    needs = {"24gb": MemoryNeed(16 * GIB, 68 * GIB), "80gb": MemoryNeed(70 * GIB, 6 * GIB)}

    def predict(config):
        return needs["24gb"] if config.memory.block_offload else needs["80gb"]

    app = make_app(tmp_path, presets_dir, no_driver=True, predict=predict, start_mode="presets")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = app.screen
        screen.repaint()
        await pilot.pause()
        field = screen.query_one("#host-gb")
        assert field.value == "200.0" and app.session.host_override_gb is None  # the fake host's live reading

        def table() -> dict[str, list[str]]:  # the rows are in name order
            t = screen.query_one("#presets")
            return {name: [str(c) for c in t.get_row_at(i)] for i, name in enumerate(("24gb", "80gb"))}

        app.session.vram_override_gb = 24
        screen._painted_version = -1
        screen.repaint()
        assert "recommended" in table()["24gb"][1]  # 68 GiB of host RAM needed, 200 available
        # Plan for a 32 GiB host: the 24gb preset no longer fits, and the note says what is short.
        field.focus()
        field.value = ""
        await pilot.press("3", "2")
        await pilot.pause()
        assert app.session.host_override_gb == 32.0
        assert "host RAM too small" in table()["24gb"][4] and "recommended" not in table()["24gb"][1]
        note = str(screen.query_one("#preset-note").render())
        assert "host RAM is short" in note and "36.0 GiB short" in note
        # A size out of range is refused (the field turns invalid) and the live reading is used again.
        field.value = ""
        await pilot.press("0", ".", "5")
        await pilot.pause()
        assert app.session.host_override_gb is None and field.has_class("-invalid")
        assert "is not a size from 1 to 65536 GiB" in str(screen.query_one("#preset-note").render())
        assert "recommended" in table()["24gb"][1]
        # Emptied, the field follows the live reading again once the cursor leaves it.
        field.value = ""
        await pilot.pause()
        screen.query_one("#presets").focus()
        await pilot.pause()
        screen._painted_version = -1
        screen.repaint()
        await pilot.pause()
        assert field.value == "200.0" and app.session.host_override_gb is None


async def test_presets_use_keeps_datasets(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, start_mode="presets")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        table = app.screen.query_one("#presets")
        table.focus()
        table.move_cursor(row=0)  # 24gb (sorted by name)
        await pilot.press("u")
        assert app.session.preset_path.name == "24gb.toml"
        assert app.session.config.memory.block_offload
        assert app.session.config.data.datasets[0].path == str(tmp_path / "clips")


# -- Config ----------------------------------------------------------------------------------------------------

async def test_config_inline_errors_save_and_diff(tmp_path, presets_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "mine.toml"
    target.write_text('# my run, keep this comment\nextends = "presets/base.toml"\n\n[optim]\nlr = 0.0001 # peak\n')
    app = make_app(tmp_path, presets_dir, start_mode="config")
    app.session.config_path = target
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.screen
        screen.query_one("#topics").active = "topic-optimisation"
        await pilot.pause()
        lr = screen.query_one("#f-optim--lr")
        lr.value = "fast"
        await pilot.pause()
        error = screen.query_one("#err-f-optim--lr")
        assert "is not a value of this type" in str(error.render()) and error.has_class("shown")
        lr.value = "-1"
        await pilot.pause()
        assert "must be greater than 0" in str(error.render())
        assert "problem" in str(screen.query_one("#config-status").render())
        await pilot.press("ctrl+s")  # refused while invalid
        assert "lr = 0.0001 # peak" in target.read_text()
        lr.value = "0.0002"
        await pilot.pause()
        assert not error.has_class("shown")
        assert app.session.config.optim.lr == 0.0002
        screen.query_one("#save-path").value = str(target)
        await pilot.press("ctrl+s")
        text = target.read_text()
        assert "# my run, keep this comment" in text and "lr = 0.0002" in text
        assert load_config(target).optim.lr == 0.0002
        await pilot.press("ctrl+d")
        assert "optim.lr: 0.0001 -> 0.0002" in str(screen.query_one("#diff").render())


# -- Run -------------------------------------------------------------------------------------------------------

async def test_run_steps_advance_and_stop_checkpoints(tmp_path, presets_dir):
    engine = FakeEngine(steps=100, hold_at_step=8, clock=fixed_clock())
    app = make_app(tmp_path, presets_dir, engine=engine, start_mode="run")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        assert engine.started.wait(10)
        for _ in range(50):  # the engine holds at step 8 until stopped
            await pilot.pause(0.05)
            if app.screen.model.snapshot().step == 7:
                break
        snap = app.screen.model.snapshot()
        assert snap.status == "running" and snap.step == 7 and len(snap.losses) == 7
        await pilot.press("x")
        assert isinstance(app.screen, ConfirmStop)
        await pilot.click("#answer-stop")
        await settle(app, pilot)
        snap = app.screen.model.snapshot()
        assert snap.status == "stopped"
        assert Path(snap.checkpoint_path).is_dir() and snap.checkpoint_step == 7
        assert "checkpoint (stop) at step 7" in "\n".join(snap.log)


def _tracked_engine(config, subscribers, stop, run_dir=None):
    """A run whose wandb, webhooks and Hub upload report, as engine.train.trackers does."""
    from engine.events import EventBus, RunEnded, RunStarted, TrackerStatus

    bus = EventBus()
    for fn in subscribers:
        bus.subscribe(fn)
    bus.emit(RunStarted(run_dir=str(run_dir), config_hash="h", total_steps=4, name="voice"))
    bus.emit(TrackerStatus(tracker="wandb", state="running", detail="run k3x9 offline"))
    bus.emit(TrackerStatus(tracker="webhooks", state="ok", detail="3 sent, 0 failed"))
    end = RunEnded(status="completed", reason="trained 4 steps")
    bus.emit(end)
    bus.emit(TrackerStatus(tracker="hub", state="failed", detail="retry: s2v-tui push runs/voice"))
    return end


async def test_the_run_screen_shows_where_wandb_webhooks_and_the_upload_stand(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, engine=_tracked_engine, start_mode="run")
    async with app.run_test(size=SIZE) as pilot:
        line = app.screen.query_one("#run-trackers")
        assert not line.display  # nothing to show before a service reports
        await pilot.press("s")
        await settle(app, pilot)
        await pilot.pause(0.6)  # the next paint
        assert line.display and line.size.height == 3
        assert str(line.render()).splitlines() == [
            "wandb running: run k3x9 offline", "webhooks ok: 3 sent, 0 failed",
            "hub failed: retry: s2v-tui push runs/voice"]


async def test_quit_during_run_asks_then_stops_with_checkpoint(tmp_path, presets_dir):
    engine = FakeEngine(steps=100, hold_at_step=3, clock=fixed_clock())
    app = make_app(tmp_path, presets_dir, engine=engine, start_mode="run")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        assert engine.started.wait(10)
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, ConfirmQuit)
        await pilot.press("escape")  # keep training
        assert app.training_active()
        await pilot.press("ctrl+q")
        await pilot.click("#answer-stop")
        await app.workers.wait_for_complete()
        await pilot.pause()
    assert app.return_code == 0
    assert (tmp_path / "runs" / "s2v-lora" / "checkpoints" / "step_000002").is_dir()


async def test_engine_failure_shows_modal_and_writes_train_log(tmp_path, presets_dir):
    engine = FakeEngine(steps=10, fail_at_step=4, clock=fixed_clock())
    app = make_app(tmp_path, presets_dir, engine=engine, start_mode="run")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await settle(app, pilot)
        assert isinstance(app.screen, ErrorReport)
        run_dir = tmp_path / "runs" / "s2v-lora"
        assert str(run_dir) in str(app.screen.query_one("#error-run-dir").render())
        log = (run_dir / "train.log").read_text()
        assert "RuntimeError: fake engine failure at step 4" in log and "Traceback" in log
        await pilot.press("escape")
        assert app.screen.model.snapshot().status == "failed"


async def test_start_refused_without_dataset(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, datasets=False, start_mode="run")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await pilot.pause()
        assert not app.training_active()
        assert "no dataset is given" in app.screen.start_refusal()


def _cannot_run_here(config):
    """save_attention with offloaded checkpoint inputs: a valid file, refused on every device by the engine's one
    rule (engine.train.allowed.setting_problems)."""
    config = with_value(config, "memory.checkpoint_policy", "save_attention")
    return with_value(config, "memory.offload_checkpoint_inputs", True)


async def test_start_refused_with_the_engines_message_for_settings_that_cannot_run_here(tmp_path, presets_dir):
    engine = FakeEngine(steps=5, clock=fixed_clock())
    app = make_app(tmp_path, presets_dir, engine=engine, start_mode="run")
    app.session.config = _cannot_run_here(app.session.config)
    expected = setting_problems(app.session.config, 1, None)
    assert expected == [SAVE_ATTENTION_CONFLICT]  # the rule this test leans on
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await settle(app, pilot)
        assert not app.training_active() and not engine.started.is_set()  # no worker, the engine never called
        assert not (tmp_path / "runs").exists()
        shown = [n.message for n in app._notifications]
        assert any(SAVE_ATTENTION_CONFLICT in m and "cannot run here" in m for m in shown), shown
        app.session.config = with_value(app.session.config, "memory.checkpoint_policy", "full")
        await pilot.press("s")  # the same run with the conflict gone starts
        await settle(app, pilot)
        assert engine.started.is_set() and app.screen.model.snapshot().status == "completed"


async def test_the_config_screen_says_which_valid_settings_cannot_run_here(tmp_path, presets_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(tmp_path, presets_dir, start_mode="config")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.screen
        assert "config valid" in str(screen.query_one("#config-status").render())
        app.session.config = _cannot_run_here(app.session.config)
        assert screen.validate_all() == []  # valid as a file: saving stays allowed
        status = str(screen.query_one("#config-status").render())
        assert "cannot run here" in status and "does not combine with offload_checkpoint_inputs" in status
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert load_config(tmp_path / "s2v-run.toml").memory.offload_checkpoint_inputs


async def test_hangup_leaves_run_going(tmp_path, presets_dir):
    engine = FakeEngine(steps=100, hold_at_step=3, clock=fixed_clock())
    app = make_app(tmp_path, presets_dir, engine=engine, start_mode="run")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        assert engine.started.wait(10)
        run_screen = app.screen
        app.hangup()
        await pilot.pause()
        assert app.hung_up and not run_screen.stop_event.is_set()
        run_screen.stop_event.set()  # let the held fake engine finish so the test ends


async def test_command_palette_lists_screens_and_actions_with_the_folder_box_focused(tmp_path, presets_dir):
    """The system commands left out every key the focused text box takes as text: no screen at all."""
    app = make_app(tmp_path, presets_dir, datasets=False)
    async with app.run_test(size=SIZE) as pilot:
        app.screen.query_one("#folder").focus()
        await pilot.press("ctrl+p")
        await pilot.pause(0.3)
        await pilot.press(*"runs screen")
        await pilot.pause(0.5)
        commands = app.screen.query_one("CommandList")
        prompts = [str(commands.get_option_at_index(i).prompt) for i in range(commands.option_count)]
        assert any("Go to the Runs screen (5)" in p for p in prompts), prompts
        await pilot.press("enter")
        await pilot.pause()
        assert app.current_mode == "attach"
        titles = [title for title, _, _ in S2VCommands(app.screen)._commands()]
        assert "Start training" in titles and any("New run" in t for t in titles)
        assert any(t.startswith("Runs: Refresh") for t in titles)  # the shown screen's own actions


def test_animation_off_and_no_color_respected(tmp_path, presets_dir, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app(tmp_path, presets_dir)
    assert app.animation_level == "none"
    assert app.no_color


async def test_the_log_follows_new_lines_after_a_resize(tmp_path, presets_dir):
    engine = FakeEngine(steps=100, hold_at_step=4, clock=fixed_clock())
    app = make_app(tmp_path, presets_dir, engine=engine, start_mode="run")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("s")
        assert engine.started.wait(10)
        screen = app.screen
        for i in range(40):
            screen.model._say(0, f"line {i} " + "x" * (100 if i % 3 else 10))
        screen.model.version += 1
        await pilot.pause(0.8)
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.3)
        screen.model._say(0, "the newest line")
        screen.model.version += 1
        await pilot.pause(0.8)
        log = screen.query_one("#run-log")
        assert log.scroll_y == log.max_scroll_y > 0
        screen.stop_event.set()
        await settle(app, pilot)


async def test_a_negative_vram_size_is_refused_with_a_reason(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, no_driver=True, start_mode="presets")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.screen.repaint()
        app.screen.query_one("#vram").focus()
        await pilot.press("-", "3")
        await pilot.pause()
        assert app.session.vram_override_gb is None
        assert "VRAM '-3' is not a size from 1 to 1024 GiB" in str(app.screen.query_one("#preset-note").render())
        await pilot.press("backspace", "backspace", "2", "4")
        await pilot.pause()
        assert app.session.vram_override_gb == 24.0
        assert "is not a size" not in str(app.screen.query_one("#preset-note").render())
