"""Engine events: JSON round trip, the bus's isolation of failing subscribers, the JSONL log and its followers."""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import threading
import time

import pytest

from engine import event_log
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
        ev.TrackerStatus(tracker="hub", state="failed", detail="retry: s2v-tui push /r"),
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
    from s2v_tui.app_logic import fmt

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
    with pytest.raises(ValueError, match="tracker"):
        ev.TrackerStatus(tracker="mlflow", state="running")


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
    with event_log.JsonlEventWriter(tmp_path) as writer:
        for event in originals[:4]:
            writer(event)
    path = tmp_path / ev.EVENTS_FILENAME
    assert event_log.read_events(path) == originals[:4]
    # A writer killed mid-line leaves half a line; the reader ignores it...
    with open(path, "ab") as f:
        f.write(originals[4].to_json().encode()[:20])
    assert event_log.read_events(path) == originals[:4]
    # ...and a resumed writer starts on a fresh line, so nothing after it is lost.
    with event_log.JsonlEventWriter(tmp_path) as writer:
        for event in originals[4:]:
            writer(event)
    assert event_log.read_events(path) == originals[:4] + originals[4:]


def test_reader_skips_a_corrupt_middle_line(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    a, b = ev.PhaseChanged(phase="load"), ev.PhaseChanged(phase="train")
    path.write_text(a.to_json() + "\ngarbage\n" + b.to_json() + "\n")
    with caplog.at_level(logging.WARNING, logger="engine.events"):
        assert event_log.read_events(path) == [a, b]
    assert ":2:" in caplog.text


def _follow_into(path, out: list, stop: threading.Event, **kwargs) -> threading.Thread:
    def run() -> None:
        for event in event_log.follow_events(path, stop, poll_s=0.01, **kwargs):
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


class _FlakyDisk:
    """Stands in for the writer's os.write: fails with `code` while `failing`; the first failure of an episode
    may first write part of the line (`short`), as a disk filling mid-line does."""

    def __init__(self, monkeypatch, code: int = errno.ENOSPC, short: int = 0) -> None:
        self.real = event_log._write_some
        self.code, self.short = code, short
        self.failing = False
        self.failures = 0
        monkeypatch.setattr(event_log, "_write_some", self)

    def __call__(self, fd: int, data: memoryview) -> int:
        if not self.failing:
            return self.real(fd, data)
        self.failures += 1
        if self.failures == 1 and self.short and len(data) > self.short:
            return self.real(fd, data[: self.short])
        raise OSError(self.code, os.strerror(self.code))


def _steps(first: int, last: int, total: int = 20) -> list[ev.StepEnd]:
    return [ev.StepEnd(step=i, total_steps=total, epoch=0, loss=math.nan if i == 3 else 1.0 / i,
                       loss_smooth=0.5, lr=1e-4) for i in range(first, last + 1)]


def _nan_equal(got: list[ev.Event], want: list[ev.Event]) -> bool:
    return len(got) == len(want) and all(
        type(g) is type(w) and all(_same(getattr(g, f.name), getattr(w, f.name)) for f in dataclasses.fields(w))
        for g, w in zip(got, want))


def test_a_full_disk_delays_events_but_loses_none_and_never_detaches_the_writer(tmp_path, monkeypatch, caplog):
    path = tmp_path / ev.EVENTS_FILENAME
    disk = _FlakyDisk(monkeypatch, short=10)
    bus = ev.EventBus()
    writer = event_log.JsonlEventWriter(tmp_path)
    bus.subscribe(writer)
    # The engine's log records come back to the bus as LogLine events: the writer's own warning must not
    # deadlock on it, nor be written ahead of the events that were waiting.
    handler = ev.LogRecordsToEvents(bus)
    engine_log = logging.getLogger("engine")
    engine_log.addHandler(handler)
    followed: list[ev.Event] = []
    stop = threading.Event()
    follower = _follow_into(path, followed, stop)
    before = [ev.RunStarted(run_dir=str(tmp_path), config_hash="h", total_steps=8), ev.PhaseChanged(phase="train")]
    during = _steps(1, 5, total=8)
    after = [*_steps(6, 8, total=8), ev.CheckpointSaved(step=8, path="/r/c", reason="final"),
             ev.RunEnded(status="completed")]
    try:
        with caplog.at_level(logging.INFO, logger="engine.events"):
            for event in before:
                bus.emit(event)
            disk.failing = True
            for event in during:
                bus.emit(event)
            assert writer in bus.subscribers and disk.failures >= len(during)
            disk.failing = False
            for event in after:
                bus.emit(event)
        _wait_for(lambda: followed and followed[-1].kind == "run_ended")
    finally:
        stop.set()
        follower.join(timeout=5)
        engine_log.removeHandler(handler)
        writer.close()
    assert writer in bus.subscribers
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning per failure episode, not one per event"
    assert str(path) in warnings[0].getMessage() and "No space left on device" in warnings[0].getMessage()
    assert "written again" in caplog.text
    events = event_log.read_events(path)
    logged = [e for e in events if e.kind == "log"]
    assert _nan_equal([e for e in events if e.kind != "log"], before + during + after)  # step 3's loss is NaN
    assert any("cannot write" in e.message for e in logged)
    assert [e.kind for e in followed if e.kind != "log"] == [e.kind for e in before + during + after]
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=_no_bare_constants)


def test_a_long_failure_keeps_the_newest_events_and_says_how_many_were_lost(tmp_path, monkeypatch):
    disk = _FlakyDisk(monkeypatch)
    writer = event_log.JsonlEventWriter(tmp_path, max_pending=4)
    writer(ev.PhaseChanged(phase="train"))
    disk.failing = True
    for step in _steps(1, 10):
        writer(step)
    disk.failing = False
    writer(_steps(11, 11)[0])
    writer.close()
    events = event_log.read_events(tmp_path / ev.EVENTS_FILENAME)
    assert events[0] == ev.PhaseChanged(phase="train", ts=events[0].ts)
    marker = events[1]
    assert marker.kind == "warning" and marker.code == "events_lost"
    kept = [e.step for e in events[2:]]
    assert kept == list(range(kept[0], 12)) and len(kept) >= 3  # the newest, in order, up to the last
    lost = int(marker.message.split()[0])
    assert lost == kept[0] - 1, "the marker counts exactly the steps that are missing"
    assert "No space left on device" in marker.message


def test_a_broken_descriptor_is_reopened_and_a_half_written_line_ended(tmp_path, monkeypatch, caplog):
    disk = _FlakyDisk(monkeypatch, code=errno.EIO, short=12)
    writer = event_log.JsonlEventWriter(tmp_path)
    first_fd = writer._fd
    disk.failing = True
    steps = _steps(1, 4)
    writer(steps[0])  # 12 bytes reach the file, then EIO: the descriptor is dropped
    assert writer._fd is None
    disk.failing = False
    for step in steps[1:]:
        writer(step)
    writer.close()
    assert first_fd is not None
    with caplog.at_level(logging.WARNING, logger="engine.events"):
        events = event_log.read_events(tmp_path / ev.EVENTS_FILENAME)
    assert [e.step for e in events] == [1, 2, 3, 4]  # the torn fragment stands alone and is skipped
    assert "skipped event line" in caplog.text


def test_a_failed_fsync_is_tried_again_and_never_raises(tmp_path, monkeypatch):
    calls = []

    def fsync_fails_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)

    monkeypatch.setattr(event_log, "_fsync", fsync_fails_once)
    writer = event_log.JsonlEventWriter(tmp_path)
    writer(ev.CheckpointSaved(step=1, path="/r/c"))  # fsynced: fails, the line is already in the file
    writer(ev.PhaseChanged(phase="train"))  # not an fsync kind, but the due fsync is tried again
    writer.close()
    assert len(calls) >= 2
    assert [e.kind for e in event_log.read_events(tmp_path / ev.EVENTS_FILENAME)] == ["checkpoint_saved", "phase_changed"]


def test_close_tries_once_more_and_never_raises(tmp_path, monkeypatch, caplog):
    disk = _FlakyDisk(monkeypatch)
    writer = event_log.JsonlEventWriter(tmp_path)
    disk.failing = True
    writer(ev.PhaseChanged(phase="train"))
    disk.failing = False
    writer.close()  # the disk has room again: close writes what waited
    assert [e.kind for e in event_log.read_events(tmp_path / ev.EVENTS_FILENAME)] == ["phase_changed"]

    other = tmp_path / "other"
    writer = event_log.JsonlEventWriter(other)
    disk.failing = True
    writer(ev.PhaseChanged(phase="train"))
    writer(ev.RunEnded(status="stopped"))
    with caplog.at_level(logging.WARNING, logger="engine.events"):
        writer.close()
        writer.close()
    assert "2 events could not be written" in caplog.text and str(other / ev.EVENTS_FILENAME) in caplog.text
    writer(ev.PhaseChanged(phase="done"))  # after close: ignored, not raised
