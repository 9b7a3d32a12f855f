"""The host-RAM guard (engine.train.host_guard) on injected readings: trips under the margin, latches, polls from
a thread that is joined on stop, and names what to change."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config, validate_config, with_value
from engine.memory import GIB
from engine.presets import shipped_presets
from engine.train.host_guard import HostMemoryGuard, settings_advice

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def test_a_low_reading_trips_with_the_figures_and_the_way_forward():
    config = load_config(PRESETS / "24gb.toml")
    guard = HostMemoryGuard.from_config(config, lambda: int(1.25 * GIB))
    reason = guard.check()
    assert reason is not None and guard.tripped.is_set()
    assert "1.2 GiB available" in reason  # 1.25 GiB, one decimal
    assert "memory.host_ram_margin_gb = 2 GB (1.9 GiB)" in reason
    assert "Rerunning the same command resumes from the checkpoint written now" in reason
    assert "memory.offload_checkpoint_inputs = false" in reason and "memory.blocks_resident" in reason


def test_a_normal_reading_does_not_trip_and_none_means_no_reading():
    guard = HostMemoryGuard(2 * GIB, lambda: 40 * GIB)
    assert guard.check() is None and not guard.tripped.is_set() and guard.lowest_bytes == 40 * GIB
    assert HostMemoryGuard(2 * GIB, lambda: None).check() is None

    def broken() -> int:
        raise OSError("no /proc")

    assert HostMemoryGuard(2 * GIB, broken).check() is None


def test_margin_zero_turns_the_guard_off():
    config = with_value(load_config(PRESETS / "24gb.toml"), "memory.host_ram_margin_gb", 0.0)
    guard = HostMemoryGuard.from_config(config, lambda: 0)
    assert not guard.enabled and guard.check() is None
    with guard:
        assert not guard.running  # no thread at all


def test_the_thread_latches_a_spike_and_is_joined_on_stop():
    readings = iter([40 * GIB, 40 * GIB, GIB // 2])  # a spike on the third poll, then memory is back

    def read() -> int:
        return next(readings, 40 * GIB)

    guard = HostMemoryGuard(2 * GIB, read, advice="Use the preset 'x'.", interval_s=0.01)
    with guard:
        assert guard.running
        assert guard.tripped.wait(5)
        thread = guard._thread
    assert not guard.running and thread is not None and not thread.is_alive()
    # At the step boundary, with memory recovered, the loop still gets the spike's reason.
    reason = guard.check()
    assert reason is not None and "0.5 GiB available" in reason and reason.endswith("Use the preset 'x'.")
    assert guard.lowest_bytes == GIB // 2


def test_stop_joins_a_polling_thread_at_once():
    guard = HostMemoryGuard(2 * GIB, lambda: 40 * GIB, interval_s=30.0)
    guard.start()
    assert guard.running and any(t.name == "host-ram-guard" for t in threading.enumerate())
    started = time.monotonic()
    guard.stop()
    assert time.monotonic() - started < 5  # the 30 s wait is an event, woken by stop()
    assert not guard.running and not any(t.name == "host-ram-guard" for t in threading.enumerate())
    guard.stop()  # twice is harmless


def test_the_reason_names_a_preset_that_needs_less_host_ram_when_one_fits_the_card():
    presets = shipped_presets()
    fp8 = load_config(PRESETS / "32gb.toml")
    on_80 = HostMemoryGuard.from_config(fp8, lambda: GIB, presets=presets, vram_bytes=80 * GIB).check()
    assert "The preset '80gb' needs about" in on_80 and "another output.name" in on_80
    # Where nothing shipped needs less host RAM and fits the card, the settings are named instead.
    others = {name: cfg for name, cfg in presets.items() if name != "24gb-lowram"}
    on_32 = HostMemoryGuard.from_config(fp8, lambda: GIB, presets=others, vram_bytes=32 * GIB).check()
    assert "preset" not in on_32.split("resumes")[1] and "memory.offload_checkpoint_inputs = false" in on_32


def test_a_24gb_run_short_of_host_ram_is_pointed_at_the_lowram_preset_as_a_new_run(monkeypatch):
    import engine.memory

    monkeypatch.setattr(engine.memory, "loader_quantises_while_loading", lambda: True)  # wt-lowbit's loader
    presets = shipped_presets()
    reason = HostMemoryGuard.from_config(presets["24gb"], lambda: GIB, presets=presets, vram_bytes=24 * GIB).check()
    assert "The preset '24gb-lowram' needs about 26.8 GiB of host RAM against 46.9 GiB" in reason
    assert "another output.name: 24gb-lowram changes the base's numerics" in reason  # int8: not a placement key
    own = HostMemoryGuard.from_config(presets["24gb-lowram"], lambda: GIB, presets=presets,
                                      vram_bytes=24 * GIB).check()
    assert "a higher memory.gpu_saved_inputs (now 21" in own


def test_advice_when_nothing_optional_is_in_host_ram():
    config = load_config(PRESETS / "80gb.toml")
    assert settings_advice(config) == "This config keeps nothing optional in host RAM: use a host with more RAM."


def test_a_negative_margin_is_refused_with_the_fix():
    config = with_value(load_config(PRESETS / "24gb.toml"), "memory.host_ram_margin_gb", -1.0)
    with pytest.raises(ConfigError, match="host_ram_margin_gb") as err:
        validate_config(config)
    assert "0 turns the host-RAM guard off" in str(err.value)
