"""GPU and host memory readings for the preset picker, the run panels and the pre-flight check.

NVML (nvidia-ml-py) is started on first use, not at import, and every query is safe: a reading the driver
cannot give is None, never an exception. "No NVIDIA driver" is a state with a readable reason (the machine
may be a laptop, a CI box, or a container without the driver mounted), not a crash. Indices are NVML's
(physical order); use `uuid` to match them with torch devices under CUDA_VISIBLE_DEVICES.

Tests and the TUI's offline mode pass a module-like fake (see `engine.gpu_fake`) instead of pynvml.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSnapshot:
    """One reading of one GPU. Any field the driver would not give is None."""

    index: int
    name: str
    uuid: str | None
    total_bytes: int | None
    used_bytes: int | None
    free_bytes: int | None
    util_percent: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class HostMemory:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    process_rss_bytes: int  # this process: the training run, or the TUI when it only watches
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ProbeState:
    available: bool
    reason: str  # why not available ("" when it is)
    driver_version: str | None = None
    device_count: int = 0


def _text(value: Any) -> str:
    # Older nvidia-ml-py returned bytes, newer returns str.
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class GpuProbe:
    """Safe, lazily started NVML reader. Thread-safe; cheap to poll at 1 Hz.

    `nvml` is a module-like object with pynvml's functions and error class; None imports pynvml on first use.
    A failed start is remembered (no dlopen every second); `reset()` tries again.
    """

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._state: ProbeState | None = None
        self._handles: dict[int, Any] = {}
        self._failed_queries: set[str] = set()

    # -- start and state ----------------------------------------------------------------------------------

    def _start(self) -> ProbeState:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                return ProbeState(False, "nvidia-ml-py is not installed, so GPUs cannot be read")
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError subclasses, or OSError from a broken library
            return ProbeState(False, self._init_failure_reason(exc))
        version = self._call("nvmlSystemGetDriverVersion")
        count = self._call("nvmlDeviceGetCount")
        if not count:
            reason = "the NVIDIA driver is loaded but reports no GPU"
            return ProbeState(False, reason, _text(version) if version is not None else None, 0)
        return ProbeState(True, "", _text(version) if version is not None else None, int(count))

    def _init_failure_reason(self, exc: Exception) -> str:
        code = getattr(exc, "value", None)
        known = {
            "NVML_ERROR_LIBRARY_NOT_FOUND": "no NVIDIA driver: libnvidia-ml.so was not found",
            "NVML_ERROR_DRIVER_NOT_LOADED": "no NVIDIA driver: the kernel driver is not loaded",
            "NVML_ERROR_NO_PERMISSION": "no permission to talk to the NVIDIA driver",
            "NVML_ERROR_LIB_RM_VERSION_MISMATCH": "NVIDIA driver and library versions differ (reboot or reload)",
        }
        for constant, reason in known.items():
            if code is not None and code == getattr(self._nvml, constant, object()):
                return reason
        return f"NVML could not start: {_text(exc) or type(exc).__name__}"

    def state(self) -> ProbeState:
        with self._lock:
            if self._state is None:
                self._state = self._start()
                if not self._state.available:
                    log.info("GPU readings unavailable: %s", self._state.reason)
            return self._state

    @property
    def available(self) -> bool:
        return self.state().available

    @property
    def reason(self) -> str:
        return self.state().reason

    def device_count(self) -> int:
        return self.state().device_count

    def reset(self) -> None:
        """Forget the start result (and shut NVML down) so the next reading starts it again."""
        self.close()
        with self._lock:
            self._state = None

    def close(self) -> None:
        with self._lock:
            if self._state is not None and self._state.available:
                self._call("nvmlShutdown")
            self._state = None
            self._handles.clear()

    # -- readings -----------------------------------------------------------------------------------------

    def _call(self, name: str, *args: Any) -> Any:
        """nvml.<name>(*args), or None if the function is missing or raises. Logged once per query name, as
        an unsupported query (fan speed on a datacenter card, power on some VMs) would fail every second."""
        fn = getattr(self._nvml, name, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            if name not in self._failed_queries:
                self._failed_queries.add(name)
                log.debug("NVML %s failed: %s", name, exc)
            return None

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            handle = self._call("nvmlDeviceGetHandleByIndex", index)
            if handle is None:
                return None
            self._handles[index] = handle
        return self._handles[index]

    def snapshot(self, index: int) -> GpuSnapshot | None:
        """A reading of GPU `index`, or None if there is no such GPU or no driver."""
        state = self.state()
        if not state.available or not 0 <= index < state.device_count:
            return None
        with self._lock:
            handle = self._handle(index)
            if handle is None:
                return None
            name = self._call("nvmlDeviceGetName", handle)
            uuid = self._call("nvmlDeviceGetUUID", handle)
            memory = self._call("nvmlDeviceGetMemoryInfo", handle)
            util = self._call("nvmlDeviceGetUtilizationRates", handle)
            temp_sensor = getattr(self._nvml, "NVML_TEMPERATURE_GPU", 0)
            temperature = self._call("nvmlDeviceGetTemperature", handle, temp_sensor)
            power_mw = self._call("nvmlDeviceGetPowerUsage", handle)
            limit_mw = self._call("nvmlDeviceGetEnforcedPowerLimit", handle)
        return GpuSnapshot(
            index=index,
            name=_text(name) if name is not None else f"GPU {index}",
            uuid=_text(uuid) if uuid is not None else None,
            total_bytes=_int_attr(memory, "total"),
            used_bytes=_int_attr(memory, "used"),
            free_bytes=_int_attr(memory, "free"),
            util_percent=_int_attr(util, "gpu"),
            temperature_c=int(temperature) if temperature is not None else None,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
        )

    def snapshots(self) -> list[GpuSnapshot]:
        """Readings of every GPU that answers; [] without a driver."""
        out = [self.snapshot(i) for i in range(self.device_count())]
        return [s for s in out if s is not None]


def _int_attr(struct: Any, name: str) -> int | None:
    value = getattr(struct, name, None) if struct is not None else None
    return int(value) if value is not None else None


# A cgroup limit this large means "no limit" (v1 writes the page-rounded largest long).
_NO_CGROUP_LIMIT = 1 << 60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2 writes "max" for no limit


def _stat_value(path: Path, names: tuple[str, ...]) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    stats = dict(line.split(" ", 1) for line in lines if " " in line)
    for name in names:
        if name in stats and stats[name].strip().isdigit():
            return int(stats[name])
    return 0


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[tuple[Path, str]]:
    """The memory cgroup folders of this process, innermost first, with the version ("v1" or "v2")."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    found: list[tuple[Path, str]] = []
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and rel:
            base, version = root, "v2"
        elif "memory" in controllers.split(","):
            base, version = root / "memory", "v1"
        else:
            continue
        # Inside a container the mount may show the process's own cgroup at its root, or the whole tree: take
        # the folder of the path when it exists, else the mount's root, and every parent up to the mount (a
        # parent's limit binds too).
        leaf = base / rel.lstrip("/")
        here = leaf if leaf.is_dir() else base
        while True:
            found.append((here, version))
            if here == base or base not in here.parents:
                break
            here = here.parent
    return found


def cgroup_memory_available(root: Path = Path("/sys/fs/cgroup"),
                            proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[int, int] | None:
    """(limit, available) bytes of the tightest memory cgroup limit over this process, or None when no cgroup
    limits its memory. In a container the kernel's OOM killer acts at this limit, which /proc/meminfo (and so
    psutil) does not show. Available = limit - usage + the inactive file cache the kernel reclaims first."""
    best: tuple[int, int] | None = None
    for folder, version in _cgroup_dirs(root, proc_cgroup):
        if version == "v2":
            limit, usage = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
            reclaimable = _stat_value(folder / "memory.stat", ("inactive_file",))
        else:
            limit, usage = _read_int(folder / "memory.limit_in_bytes"), _read_int(folder / "memory.usage_in_bytes")
            reclaimable = _stat_value(folder / "memory.stat", ("total_inactive_file", "inactive_file"))
        if limit is None or usage is None or limit >= _NO_CGROUP_LIMIT:
            continue
        available = max(0, limit - usage + min(reclaimable, usage))
        if best is None or available < best[1]:
            best = (limit, available)
    return best


def host_memory() -> HostMemory:
    """Host RAM now, and the resident memory of this process. Under a memory cgroup limit (a container) total
    and available are the cgroup's when they are tighter than the machine's."""
    vm = psutil.virtual_memory()
    try:
        rss = psutil.Process().memory_info().rss
    except psutil.Error:
        rss = 0
    total, available = int(vm.total), int(vm.available)
    try:
        cgroup = cgroup_memory_available()
    except (OSError, ValueError):
        cgroup = None
    if cgroup is not None:
        total, available = min(total, cgroup[0]), min(available, cgroup[1])
    return HostMemory(
        total_bytes=total,
        available_bytes=available,
        used_bytes=total - available,  # what others cannot have, unlike psutil's `used`
        process_rss_bytes=int(rss),
    )


_default_probe: GpuProbe | None = None
_default_lock = threading.Lock()


def default_probe() -> GpuProbe:
    """The process-wide probe on the real pynvml (NVML should be started once per process)."""
    global _default_probe
    with _default_lock:
        if _default_probe is None:
            _default_probe = GpuProbe()
        return _default_probe


__all__ = ["GpuProbe", "GpuSnapshot", "HostMemory", "ProbeState", "cgroup_memory_available", "default_probe",
           "host_memory"]
