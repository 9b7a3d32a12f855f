"""A stand-in for pynvml with the calls `engine.gpu.GpuProbe` makes, for tests and demos without a GPU.

    probe = GpuProbe(FakeNvml([FakeGpu("NVIDIA H100 80GB HBM3", total_bytes=80 * GIB)]))
    probe = GpuProbe(FakeNvml(init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND))  # no driver

Readings can be changed between polls (`gpus[0].used_bytes = ...`) to drive live panels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

GIB = 1024**3


class FakeNVMLError(Exception):
    """Shaped like pynvml.NVMLError: the error code is in `.value`."""

    def __init__(self, value: int) -> None:
        super().__init__(f"fake NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    total_bytes: int = 80 * GIB
    used_bytes: int = 1 * GIB
    util_percent: int = 0
    temperature_c: int = 35
    power_mw: int = 70_000
    power_limit_mw: int = 700_000
    uuid: str = ""
    unsupported: set[str] = field(default_factory=set)  # NVML function names that raise NOT_SUPPORTED


class FakeNvml:
    NVML_SUCCESS = 0
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_TEMPERATURE_GPU = 0
    NVMLError = FakeNVMLError

    def __init__(
        self, gpus: list[FakeGpu] | None = None, init_error: int | None = None, driver_version: str = "580.65.06"
    ) -> None:
        self.gpus = list(gpus) if gpus is not None else [FakeGpu()]
        self.init_error = init_error
        self.driver_version = driver_version
        self.init_calls = 0
        self.shutdown_calls = 0
        self._started = False

    def _need_start(self) -> None:
        if not self._started:
            raise FakeNVMLError(1)  # NVML_ERROR_UNINITIALIZED

    def _gpu(self, handle: int, call: str) -> FakeGpu:
        self._need_start()
        gpu = self.gpus[handle]
        if call in gpu.unsupported:
            raise FakeNVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self._started = True

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self._started = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._need_start()
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._need_start()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._need_start()
        if not 0 <= index < len(self.gpus):
            raise FakeNVMLError(2)  # NVML_ERROR_INVALID_ARGUMENT
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid or f"GPU-fake-{handle:04d}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=gpu.total_bytes, used=gpu.used_bytes, free=gpu.total_bytes - gpu.used_bytes)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=gpu.util_percent, memory=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetTemperature").temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw


__all__ = ["GIB", "FakeGpu", "FakeNVMLError", "FakeNvml"]
