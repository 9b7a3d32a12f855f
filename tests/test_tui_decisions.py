"""A changed config on a trained run is a question before anything starts: continue (where the engine allows the
change), a new run under a proposed (editable) name, or cancel; the dialog lists the changed keys."""
from __future__ import annotations

import pytest
from test_tui_screens import SIZE, make_app

from engine.config import with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from s2v_tui.app_logic.run_decision import decide
from s2v_tui.screens.decision import RunDecisionDialog
from s2v_tui.testing.fake_engine import FakeEngine, fixed_clock
from s2v_tui.testing.fakes import fixed_doctor

pytestmark = pytest.mark.anyio


async def settle(app, pilot) -> None:
    """Until no worker is left: the folder's question and then the training are two workers one after the other."""
    for _ in range(3):
        await app.workers.wait_for_complete()
        await pilot.pause()


def starts(run_dir) -> int:
    path = run_dir / EVENTS_FILENAME
    return sum(e.kind == "run_started" for e in read_events(path)) if path.exists() else 0


async def trained_app(tmp_path, presets_dir, pilot_size=SIZE, **kw):
    """An app whose run folder holds a finished (fake) run of 5 steps."""
    app = make_app(tmp_path, presets_dir, start_mode="run", engine=FakeEngine(clock=fixed_clock()), **kw)
    app.session.config = with_value(app.session.config, "optim.max_steps", 5)
    return app


async def start_trained_then_change(app, pilot, **changes):
    await pilot.press("s")
    await settle(app, pilot)
    assert app.screen.model.snapshot().status == "completed" and starts(app.session.config.run_path()) == 1
    for key, value in changes.items():
        app.session.config = with_value(app.session.config, key, value)
    await pilot.press("s")
    await settle(app, pilot)


async def test_a_changed_learning_rate_offers_a_new_run_under_a_proposed_name(tmp_path, presets_dir):
    app = await trained_app(tmp_path, presets_dir)
    run_dir = tmp_path / "runs" / "s2v-lora"
    async with app.run_test(size=SIZE) as pilot:
        await start_trained_then_change(app, pilot, **{"optim.lr": 0.0002})
        dialog = app.screen
        assert isinstance(dialog, RunDecisionDialog) and not app.training_active()
        changes = [str(s.render()) for s in dialog.query(".change")]
        assert changes == ["optim.lr: 0.0001 -> 0.0002"]
        assert not dialog.query("#answer-continue")  # the learning rate cannot continue a trained run
        assert "optim.max_steps" in str(dialog.query_one("#decision-why").render())
        name = dialog.query_one("#new-name")
        assert name.value == "s2v-lora-2"
        name.value = "s2v-lora"
        await pilot.pause()
        assert "another name" in str(dialog.query_one("#name-error").render())
        name.value = "faster-lr"
        await pilot.click("#answer-new")
        await settle(app, pilot)
        assert app.session.config.output.name == "faster-lr"
        assert app.screen.model.snapshot().status == "completed"
        assert starts(tmp_path / "runs" / "faster-lr") == 1 and starts(run_dir) == 1  # the old run untouched


async def test_more_steps_continue_the_run_in_its_folder(tmp_path, presets_dir):
    app = await trained_app(tmp_path, presets_dir)
    run_dir = tmp_path / "runs" / "s2v-lora"
    async with app.run_test(size=SIZE) as pilot:
        await start_trained_then_change(app, pilot, **{"optim.max_steps": 9, "memory.gradient_checkpointing": False})
        dialog = app.screen
        assert isinstance(dialog, RunDecisionDialog)
        assert [str(s.render()) for s in dialog.query(".change")] == [
            "optim.max_steps: 5 -> 9", "memory.gradient_checkpointing: true -> false"]
        assert "can continue it" in str(dialog.query_one("#decision-why").render())
        await pilot.click("#answer-continue")
        await settle(app, pilot)
        assert starts(run_dir) == 2 and app.screen.model.snapshot().total_steps == 9


async def test_cancel_starts_nothing(tmp_path, presets_dir):
    app = await trained_app(tmp_path, presets_dir)
    run_dir = tmp_path / "runs" / "s2v-lora"
    async with app.run_test(size=SIZE) as pilot:
        await start_trained_then_change(app, pilot, **{"optim.max_steps": 9})
        assert isinstance(app.screen, RunDecisionDialog)
        await pilot.press("enter")  # Cancel has the focus: the safe answer
        await settle(app, pilot)
        assert starts(run_dir) == 1 and not app.training_active()
        assert "not started" in str(app.screen.query_one("#run-hint").render())


async def test_train_on_a_new_folder_under_a_trained_name_asks_instead_of_resuming(tmp_path, presets_dir):
    app = await trained_app(tmp_path, presets_dir, doctor=fixed_doctor(blocking=False))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await settle(app, pilot)
        await pilot.press("1")
        await pilot.pause()
        folder = app.screen.query_one("#folder")
        folder.value = str(tmp_path / "new-clips")
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        await pilot.press("ctrl+t")
        await settle(app, pilot)
        dialog = app.screen
        assert isinstance(dialog, RunDecisionDialog)
        assert [str(s.render()).split(":")[0] for s in dialog.query(".change")] == ["data.datasets"]
        assert starts(tmp_path / "runs" / "s2v-lora") == 1


def test_the_question_comes_from_the_engine_without_touching_the_folder(tmp_path):
    from engine.config import Config

    config = with_value(Config(), "output.run_dir", str(tmp_path / "runs"))
    config = with_value(config, "optim.max_steps", 5)
    run_dir = config.run_path()
    assert decide(config, run_dir) is None and not run_dir.exists()  # a new folder: nothing to ask
    import threading

    FakeEngine()(config, [], threading.Event(), run_dir=run_dir)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir())
    assert decide(config, run_dir) is None  # the same config: it resumes
    asked = decide(with_value(config, "lora.rank", 8), run_dir)
    assert asked.kind == "refused" and [c.key for c in asked.changes] == ["lora.rank"]
    assert asked.proposed_name == "s2v-lora-2"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir()) == before


async def test_a_finished_run_started_again_says_so_instead_of_reporting_completed(tmp_path, presets_dir, monkeypatch):
    import engine.run_folder as run_folder

    app = await trained_app(tmp_path, presets_dir)
    # The engine's answer for a folder trained to its last step (a real checkpoint of step 5 of 5).
    monkeypatch.setattr(run_folder, "resolve",
                        lambda config, run_dir, write=True: run_folder.Resolution(config, "resume", step=5))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await settle(app, pilot)
        dialog = app.screen
        assert isinstance(dialog, RunDecisionDialog) and not dialog.query("#answer-continue")
        why = str(dialog.query_one("#decision-why").render())
        assert "trained to step 5" in why and "Raise optim.max_steps" in why
        assert not (tmp_path / "runs" / "s2v-lora" / EVENTS_FILENAME).exists()  # nothing ran
