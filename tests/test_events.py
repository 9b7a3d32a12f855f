"""Engine events: JSON round trip, the bus's isolation of failing subscribers, the JSONL log and its followers."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time

import pytest

from engine import events as ev


def _one_of_each() -> list[ev.Event]:
    return [
        ev.RunStarted(run_dir="/r", config_hash="abc", total_steps=100, resumed_from_step=40, name="x"),
        ev.PhaseChanged(phase="train", detail="LoRA rank 16"),
        ev.StepEnd(
            step=41, total_steps=100, epoch=0, loss=0.25, loss_smooth=0.3, lr=1e-4, grad_norm=0.5,
            samples_per_s=2.0, s_per_step=0.5, eta_s=29.5, peak_alloc_bytes=1 << 30,
            peak_reserved_bytes=2 << 30, host_rss_bytes=3 << 30, skipped_nonfinite=1,
        ),
        ev.CheckpointSaved(step=50, path="/r/checkpoints/step-50", reason="interval"),
        ev.ValidationDone(step=50, sample_paths=("/r/a.mp4", "/r/b.mp4"), eval_loss=0.2),
        ev.RunWarning(code="cache_missing", message="encoding on the fly"),
        ev.LogLine(level="info", message="hello ✓"),
        ev.RunEnded(status="completed", reason="max_steps", outputs={"peft": "/r/lora.safetensors"}),
    ]


def test_every_kind_round_trips_through_one_json_line():
    originals = _one_of_each()
    assert {e.kind for e in originals} == set(ev.EVENT_TYPES)
    for original in originals:
        line = original.to_json()
        assert "\n" not in line
        assert json.loads(line)["kind"] == original.kind
        back = ev.event_from_json(line)
        assert back == original
        assert dataclasses.is_dataclass(back)
        with pytest.raises(dataclasses.FrozenInstanceError):
            back.ts = 0.0  # type: ignore[misc]


def _no_bare_constants(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")


def _same(a: object, b: object) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_round_trips_non_finite_values_as_strict_json(value):
    checked = 0
    for original in _one_of_each():
        floats = [f.name for f in dataclasses.fields(original) if isinstance(getattr(original, f.name), float)]
        for name in floats:
            event = dataclasses.replace(original, **{name: value})
            line = event.to_json()
            json.loads(line, parse_constant=_no_bare_constants)
            back = ev.event_from_json(line)
            assert type(back) is type(event)
            for f in dataclasses.fields(event):
                assert _same(getattr(back, f.name), getattr(event, f.name)), (event.kind, f.name)
            checked += 1
    assert checked >= 15  # ts of every kind, StepEnd's losses, lr, rates, eta, eval_loss


def test_a_nan_loss_still_formats_after_the_round_trip():
    from s2v_tui import fmt

    step = ev.StepEnd(step=1, total_steps=2, epoch=0, loss=math.nan, loss_smooth=math.inf, lr=0.0)
    back = ev.event_from_json(step.to_json())
    assert math.isnan(back.loss) and back.loss_smooth == math.inf
    assert (fmt.number(back.loss), fmt.number(back.loss_smooth), f"{back.loss:.4f}") == ("nan", "inf", "nan")


def test_strings_that_spell_a_number_stay_strings_and_old_bare_tokens_still_read():
    warning = ev.RunWarning(code="NaN", message="Infinity")
    assert ev.event_from_json(warning.to_json()) == warning
    old_line = '{"kind":"step_end","step":1,"total_steps":2,"epoch":0,"loss":NaN,"loss_smooth":-Infinity,"lr":0.0}'
    old = ev.event_from_json(old_line)
    assert math.isnan(old.loss) and old.loss_smooth == -math.inf


def test_unknown_fields_are_ignored_and_bad_lines_raise():
    line = json.dumps({"kind": "warning", "code": "c", "message": "m", "ts": 1.0, "added_later": 3})
    assert ev.event_from_json(line) == ev.RunWarning(code="c", message="m", ts=1.0)
    for bad in ('{"kind": "nope"}', '{"kind": "warning"}', "[1]", "{not json"):
        with pytest.raises(ValueError):
            ev.event_from_json(bad)


def test_enumerated_fields_are_checked():
    with pytest.raises(ValueError, match="phase"):
        ev.PhaseChanged(phase="training")
    with pytest.raises(ValueError, match="reason"):
        ev.CheckpointSaved(step=1, path="p", reason="whim")
    with pytest.raises(ValueError, match="status"):
        ev.RunEnded(status="ok")


def test_bus_detaches_a_failing_subscriber_and_keeps_the_others(caplog):
    bus = ev.EventBus()
    seen: list[ev.Event] = []

    def broken(event: ev.Event) -> None:
        raise RuntimeError("display went away")

    bus.subscribe(broken)
    unsubscribe = bus.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="engine.events"):
        bus.emit(ev.PhaseChanged(phase="load"))
        bus.emit(ev.PhaseChanged(phase="train"))
    assert [e.phase for e in seen] == ["load", "train"]
    assert broken not in bus.subscribers
    assert "detached" in caplog.text
    unsubscribe()
    bus.emit(ev.PhaseChanged(phase="done"))
    assert len(seen) == 2


def test_log_handler_forwards_records_without_looping():
    bus = ev.EventBus()
    seen: list[ev.Event] = []
    bus.subscribe(seen.append)
    bus.subscribe(lambda e: (_ for _ in ()).throw(RuntimeError("boom")))
    handler = ev.LogRecordsToEvents(bus)
    # On the "engine" logger, so the bus's own report of the failing subscriber comes back to the handler.
    root = logging.getLogger("engine")
    root.addHandler(handler)
    try:
        logging.getLogger("engine.test_forward").warning("disk is %d%% full", 91)
    finally:
        root.removeHandler(handler)
    lines = [e for e in seen if isinstance(e, ev.LogLine)]
    assert lines[0].level == "warning" and lines[0].message == "disk is 91% full"


def test_writer_appends_and_reader_ignores_a_torn_last_line(tmp_path):
    originals = _one_of_each()
    with ev.JsonlEventWriter(tmp_path) as writer:
        for event in originals[:4]:
            writer(event)
    path = tmp_path / ev.EVENTS_FILENAME
    assert ev.read_events(path) == originals[:4]
    # A writer killed mid-line leaves half a line; the reader ignores it...
    with open(path, "ab") as f:
        f.write(originals[4].to_json().encode()[:20])
    assert ev.read_events(path) == originals[:4]
    # ...and a resumed writer starts on a fresh line, so nothing after it is lost.
    with ev.JsonlEventWriter(tmp_path) as writer:
        for event in originals[4:]:
            writer(event)
    assert ev.read_events(path) == originals[:4] + originals[4:]


def test_reader_skips_a_corrupt_middle_line(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    a, b = ev.PhaseChanged(phase="load"), ev.PhaseChanged(phase="train")
    path.write_text(a.to_json() + "\ngarbage\n" + b.to_json() + "\n")
    with caplog.at_level(logging.WARNING, logger="engine.events"):
        assert ev.read_events(path) == [a, b]
    assert ":2:" in caplog.text


def _follow_into(path, out: list, stop: threading.Event, **kwargs) -> threading.Thread:
    def run() -> None:
        for event in ev.follow_events(path, stop, poll_s=0.01, **kwargs):
            out.append(event)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_follow_waits_for_the_file_and_sees_lines_only_when_complete(tmp_path):
    path = tmp_path / "events.jsonl"
    got: list[ev.Event] = []
    stop = threading.Event()
    thread = _follow_into(path, got, stop)
    time.sleep(0.05)
    first, second = ev.PhaseChanged(phase="cache"), ev.PhaseChanged(phase="train")
    with open(path, "wb") as f:
        f.write(first.to_json().encode() + b"\n")
        f.flush()
        _wait_for(lambda: len(got) == 1)
        line = second.to_json().encode()
        f.write(line[:10])  # half a line: must not be parsed yet
        f.flush()
        time.sleep(0.05)
        assert len(got) == 1
        f.write(line[10:] + b"\n")
        f.flush()
        _wait_for(lambda: len(got) == 2)
    stop.set()
    thread.join(2)
    assert not thread.is_alive()
    assert got == [first, second]


def test_follow_restarts_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "events.jsonl"
    old, new = ev.PhaseChanged(phase="check"), ev.PhaseChanged(phase="load")
    path.write_text(old.to_json() + "\n")
    got: list[ev.Event] = []
    stop = threading.Event()
    thread = _follow_into(path, got, stop)
    _wait_for(lambda: len(got) == 1)
    tmp = tmp_path / "new.jsonl"
    tmp.write_text(new.to_json() + "\n")
    tmp.replace(path)
    _wait_for(lambda: len(got) == 2)
    stop.set()
    thread.join(2)
    assert got == [old, new]


def test_follow_from_end_skips_history(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(ev.PhaseChanged(phase="check").to_json() + "\n")
    got: list[ev.Event] = []
    stop = threading.Event()
    thread = _follow_into(path, got, stop, from_start=False)
    time.sleep(0.05)
    later = ev.PhaseChanged(phase="train")
    with open(path, "a") as f:
        f.write(later.to_json() + "\n")
    _wait_for(lambda: len(got) == 1)
    stop.set()
    thread.join(2)
    assert got == [later]
