"""GPU probe: lazy start, safe queries, "no driver" as a state, host memory; all on a fake NVML."""
from __future__ import annotations

import threading

from engine.gpu import GpuProbe, GpuSnapshot, host_memory
from engine.gpu_fake import GIB, FakeGpu, FakeNvml


def test_start_is_lazy_and_happens_once():
    nvml = FakeNvml()
    probe = GpuProbe(nvml)
    assert nvml.init_calls == 0
    assert probe.available and probe.reason == ""
    probe.snapshots()
    probe.snapshots()
    assert nvml.init_calls == 1
    assert probe.state().driver_version == "580.65.06"


def test_snapshot_reads_every_field():
    nvml = FakeNvml(
        [
            FakeGpu("NVIDIA H100 80GB HBM3", total_bytes=80 * GIB, used_bytes=20 * GIB, util_percent=97,
                    temperature_c=61, power_mw=512_000, power_limit_mw=700_000),
            FakeGpu("NVIDIA GeForce RTX 4090", total_bytes=24 * GIB, used_bytes=GIB),
        ]
    )
    probe = GpuProbe(nvml)
    snaps = probe.snapshots()
    assert [s.index for s in snaps] == [0, 1]
    first = snaps[0]
    assert isinstance(first, GpuSnapshot)
    assert (first.name, first.total_bytes, first.used_bytes, first.free_bytes) == (
        "NVIDIA H100 80GB HBM3", 80 * GIB, 20 * GIB, 60 * GIB,
    )
    assert (first.util_percent, first.temperature_c, first.power_w, first.power_limit_w) == (97, 61, 512.0, 700.0)
    assert first.uuid == "GPU-fake-0000"
    nvml.gpus[0].used_bytes = 70 * GIB  # live panels see the change on the next poll
    assert probe.snapshot(0).free_bytes == 10 * GIB
    assert probe.snapshot(2) is None and probe.snapshot(-1) is None


def test_unsupported_queries_give_none_not_errors():
    gpu = FakeGpu(unsupported={"nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperature", "nvmlDeviceGetName",
                               "nvmlDeviceGetMemoryInfo"})
    snap = GpuProbe(FakeNvml([gpu])).snapshot(0)
    assert snap is not None
    assert (snap.power_w, snap.temperature_c, snap.total_bytes, snap.free_bytes) == (None, None, None, None)
    assert snap.name == "GPU 0"
    assert snap.util_percent == 0


def test_missing_functions_give_none():
    nvml = FakeNvml()
    nvml.nvmlDeviceGetEnforcedPowerLimit = None  # an older nvidia-ml-py without the call
    assert GpuProbe(nvml).snapshot(0).power_limit_w is None


def test_no_driver_is_a_state_with_a_reason():
    nvml = FakeNvml(init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    probe = GpuProbe(nvml)
    assert not probe.available
    assert "no NVIDIA driver" in probe.reason
    assert probe.snapshots() == [] and probe.snapshot(0) is None and probe.device_count() == 0
    probe.snapshots()
    assert nvml.init_calls == 1  # the failure is remembered, not retried on every poll
    nvml.init_error = None
    probe.reset()
    assert probe.available and len(probe.snapshots()) == 1


def test_other_start_failures_and_no_gpus():
    assert "not loaded" in GpuProbe(FakeNvml(init_error=FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED)).reason
    assert "permission" in GpuProbe(FakeNvml(init_error=FakeNvml.NVML_ERROR_NO_PERMISSION)).reason
    assert "NVML could not start" in GpuProbe(FakeNvml(init_error=999)).reason
    empty = GpuProbe(FakeNvml([]))
    assert not empty.available and "no GPU" in empty.reason


def test_the_real_pynvml_never_raises_here():
    # On a machine with no driver this is the "no driver" state; on a GPU machine, real readings.
    probe = GpuProbe()
    state = probe.state()
    snaps = probe.snapshots()
    if state.available:
        assert len(snaps) == state.device_count
    else:
        assert state.reason and snaps == []
    probe.close()


def test_close_shuts_down_and_polls_from_threads_are_safe():
    nvml = FakeNvml([FakeGpu(), FakeGpu()])
    probe = GpuProbe(nvml)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(len(probe.snapshots()))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2] * 8 and nvml.init_calls == 1
    probe.close()
    assert nvml.shutdown_calls == 1


def test_host_memory():
    mem = host_memory()
    assert mem.total_bytes > 0
    assert 0 < mem.available_bytes <= mem.total_bytes
    assert mem.used_bytes == mem.total_bytes - mem.available_bytes
    assert mem.process_rss_bytes > 0


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_of_a_parent_binds_and_inactive_cache_counts_as_available(tmp_path):
    from engine.gpu import cgroup_memory_available

    root = tmp_path / "cg"
    _write(tmp_path / "self", "0::/box/job\n")
    _write(root / "box" / "job" / "memory.max", "max\n")  # the job itself: no limit
    _write(root / "box" / "job" / "memory.current", str(5 * GIB))
    _write(root / "box" / "memory.max", str(32 * GIB))  # the container: 32 GiB
    _write(root / "box" / "memory.current", str(30 * GIB))
    _write(root / "box" / "memory.stat", f"anon {28 * GIB}\ninactive_file {GIB}\n")
    assert cgroup_memory_available(root, tmp_path / "self") == (32 * GIB, 3 * GIB)


def test_cgroup_v1_unlimited_or_missing_is_no_limit(tmp_path):
    from engine.gpu import cgroup_memory_available

    root = tmp_path / "cg"
    _write(tmp_path / "self", "4:memory:/docker/abc\n0::/\n")
    # The container's mount shows its own cgroup at the root (the path does not exist there).
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(root / "memory" / "memory.usage_in_bytes", str(GIB))
    assert cgroup_memory_available(root, tmp_path / "self") is None
    _write(root / "memory" / "memory.limit_in_bytes", str(16 * GIB))
    _write(root / "memory" / "memory.stat", f"total_inactive_file {GIB // 2}\n")
    assert cgroup_memory_available(root, tmp_path / "self") == (16 * GIB, 15 * GIB + GIB // 2)
    assert cgroup_memory_available(root, tmp_path / "missing") is None
