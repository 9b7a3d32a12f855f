"""The TUI's pieces without a running app: run model, bridge coalescing, runs index, entry points."""
from __future__ import annotations

import math
import sys
import threading

import pytest

from engine.config import Config
from engine.events import CheckpointSaved, LogLine, RunEnded, RunStarted, StepEnd
from s2v_tui.app_logic.presets_logic import recommend
from s2v_tui.app_logic.run_model import LOSS_HISTORY, RunModel
from s2v_tui.app_logic.runs_index import list_runs, summarise
from s2v_tui.bridge import EventBridge, EventsPending
from s2v_tui.commands import tui as tui_main
from s2v_tui.services import engine_memory_predictor
from s2v_tui.testing.fake_engine import FakeEngine, fixed_clock


def step(n: int, loss: float = 0.5) -> StepEnd:
    return StepEnd(step=n, total_steps=100, epoch=0, loss=loss, loss_smooth=loss, lr=1e-4, s_per_step=2.0,
                   samples_per_s=0.5, eta_s=(100 - n) * 2.0, ts=0.0)


def test_run_model_accumulates_and_snapshots_are_copies():
    model = RunModel()
    model.apply(RunStarted(run_dir="runs/a", config_hash="x", total_steps=100, ts=0.0))
    for n in range(1, LOSS_HISTORY + 10):
        model.apply(step(n, loss=1.0 / n))
    model.apply(step(LOSS_HISTORY + 10, loss=math.nan))  # skipped step: counted, not drawn
    snap = model.snapshot()
    assert len(snap.losses) == LOSS_HISTORY and snap.min_loss == pytest.approx(1.0 / (LOSS_HISTORY + 9))
    assert snap.step == LOSS_HISTORY + 10 and snap.status == "running"
    model.apply(CheckpointSaved(step=5, path="runs/a/ck", reason="stop", ts=0.0))
    model.apply(RunEnded(status="stopped", reason="user", ts=0.0))
    assert snap.checkpoint_path == "" and snap.status == "running"  # the old snapshot did not change
    later = model.snapshot()
    assert later.status == "stopped" and later.checkpoint_step == 5 and later.version > snap.version


def test_run_model_keeps_the_last_state_of_each_tracker_and_logs_only_changes():
    from engine.events import TrackerStatus

    model = RunModel()
    model.apply(RunStarted(run_dir="runs/a", config_hash="x", total_steps=10, ts=0.0))
    model.apply(TrackerStatus(tracker="hub", state="uploading", detail="the LoRA of checkpoint 5", ts=0.0))
    model.apply(TrackerStatus(tracker="webhooks", state="ok", detail="1 sent, 0 failed", ts=0.0))
    model.apply(TrackerStatus(tracker="webhooks", state="ok", detail="2 sent, 0 failed", ts=0.0))
    model.apply(TrackerStatus(tracker="wandb", state="running", detail="run abc", ts=0.0))
    model.apply(RunEnded(status="completed", reason="r", ts=0.0))
    model.apply(TrackerStatus(tracker="hub", state="failed", detail="retry: s2v-tui push runs/a", ts=0.0))
    snap = model.snapshot()
    assert snap.trackers == (("wandb", "running", "run abc"), ("webhooks", "ok", "2 sent, 0 failed"),
                             ("hub", "failed", "retry: s2v-tui push runs/a"))
    logged = [line.split(" ", 1)[1] for line in snap.log if "webhooks" in line or "hub" in line]
    assert logged == ["hub uploading: the LoRA of checkpoint 5", "webhooks ok: 1 sent, 0 failed",
                      "hub failed: retry: s2v-tui push runs/a"]
    model.apply(RunStarted(run_dir="runs/b", config_hash="y", total_steps=10, ts=0.0))
    assert model.snapshot().trackers == ()  # another run: its own services report afresh


class _Target:
    """Stands in for a Textual node: collects posted messages, as its queue would before coalescing."""

    def __init__(self) -> None:
        self.messages: list = []

    def post_message(self, message) -> bool:
        self.messages.append(message)
        return True


def test_bridge_coalesces_notifications_but_loses_no_event():
    target = _Target()
    bridge = EventBridge(target)
    thread = threading.Thread(target=lambda: [bridge(step(n)) for n in range(1, 1001)])
    thread.start()
    thread.join()
    first, second = target.messages[0], target.messages[1]
    assert isinstance(first, EventsPending) and first.can_replace(second)
    assert not first.can_replace(EventsPending(EventBridge(target)))  # another bridge's news stays
    assert [e.step for e in bridge.drain()] == list(range(1, 1001))
    assert bridge.drain() == []


def test_fake_engine_obeys_the_runner_contract(tmp_path):
    stop = threading.Event()
    seen = []
    engine = FakeEngine(steps=10, clock=fixed_clock())

    def subscriber(event):
        seen.append(event)
        if isinstance(event, StepEnd) and event.step == 4:
            stop.set()

    end = engine(Config(), [subscriber], stop, run_dir=tmp_path / "r")
    assert end.status == "stopped"
    assert [e.step for e in seen if isinstance(e, StepEnd)] == [1, 2, 3, 4]
    saved = [e for e in seen if isinstance(e, CheckpointSaved)]
    assert saved[-1].reason == "stop" and saved[-1].step == 4
    summary = summarise(tmp_path / "r")
    assert summary.status == "stopped" and summary.step == 4 and summary.total_steps == 10


def test_runs_index_tells_a_dead_run_from_a_live_one(tmp_path):
    from engine.event_log import JsonlEventWriter

    with JsonlEventWriter(tmp_path / "dead") as w:
        w(RunStarted(run_dir=str(tmp_path / "dead"), config_hash="x", total_steps=9, pid=2**22 + 12345))
        w(step(3))
    with JsonlEventWriter(tmp_path / "live") as w:
        w(RunStarted(run_dir=str(tmp_path / "live"), config_hash="x", total_steps=9))
        w(LogLine(level="info", message="hi"))
    runs = {r.run_dir.name: r for r in list_runs(tmp_path)}
    assert runs["dead"].status == "gone" and runs["dead"].step == 3
    assert runs["live"].status == "running"


def test_recommend_needs_measurements():
    assert recommend([]) is None


def test_memory_predictor_says_unknown_without_engine_memory():
    predict = engine_memory_predictor()
    assert predict(Config()) is None or predict(Config()).vram_bytes > 0


def test_main_tui_refuses_without_a_tty(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    assert tui_main.main_tui([]) == 2
    assert "--run" in capsys.readouterr().err
    assert tui_main.main_attach(["runs/x"]) == 2


def test_headless_prints_a_tracker_line_only_when_it_says_something_new():
    from engine.events import TrackerStatus
    from s2v_tui.commands.headless import event_line

    assert event_line(TrackerStatus(tracker="webhooks", state="ok", detail="4 sent, 0 failed")) is None
    assert event_line(TrackerStatus(tracker="hub", state="uploading", detail="the LoRA of checkpoint 5")) is None
    assert event_line(TrackerStatus(tracker="hub", state="failed", detail="retry: s2v-tui push r")) == \
        "hub failed: retry: s2v-tui push r"
    assert event_line(TrackerStatus(tracker="wandb", state="finished")) == "wandb finished"


def test_the_eta_goes_when_the_run_stops():
    model = RunModel()
    model.apply(RunStarted(run_dir="runs/a", config_hash="x", total_steps=100, ts=0.0))
    model.apply(step(3))
    assert model.snapshot().eta_s == 194.0
    model.apply(RunEnded(status="stopped", reason="stopped at step 3", ts=0.0))
    assert model.snapshot().eta_s is None


def test_a_resumed_run_keeps_the_loss_curve_up_to_its_checkpoint():
    """Followed from events.jsonl (or resumed in the app), the chart showed only the resumed part."""
    def started(resumed: int) -> RunStarted:
        return RunStarted(run_dir="runs/a", config_hash="x", total_steps=100, resumed_from_step=resumed, ts=0.0)

    first_process = [started(0), *(step(n, loss=1.0 / n) for n in range(1, 8)), RunEnded(status="stopped", ts=0.0)]
    model = RunModel()
    for event in first_process:  # steps 1-7; the checkpoint it left is of step 5
        model.apply(event)
    model.apply(started(5))
    model.apply(step(6, loss=0.1))
    snap = model.snapshot()
    assert snap.losses == (1.0, 0.5, 1 / 3, 0.25, 0.2, 0.1) and snap.min_loss == 0.1
    fresh = RunModel()  # the Run screen of a new app: the history comes from the folder's event log first
    fresh.load_history(first_process)
    fresh.apply(started(5))
    assert fresh.snapshot().losses == (1.0, 0.5, 1 / 3, 0.25, 0.2)
    fresh.apply(started(0))  # a new run in the folder starts a new curve
    assert fresh.snapshot().losses == ()


def test_a_reader_gone_with_the_ssh_session_stops_the_output_not_the_run():
    """`s2v-tui --run ... | tee log` after the session dropped: BrokenPipeError tracebacks filled train.log."""
    from s2v_tui.commands.headless import PlainReporter

    class Gone:
        writes = 0

        def write(self, text):
            Gone.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def isatty(self):
            return False

    reporter = PlainReporter(Gone(), every=1)
    reporter(step(1))  # no exception: the event bus would log it with its traceback
    reporter(step(2))
    assert reporter.stream.lost and Gone.writes == 1
