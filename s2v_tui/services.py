"""What the app talks to outside itself, gathered in one object so tests and the demo can swap any of it.

The screens never import the engine's heavy parts directly: they call these services. Production values come
from `default_services()`; tests pass fakes (FakeNvml, the fake engine, a fixed host-memory reading).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import Config
from engine.events import RunEnded
from engine.gpu import GpuProbe, HostMemory, default_probe, host_memory

log = logging.getLogger(__name__)

# engine.runner.run(config, subscribers, stop_event, run_dir=None) -> RunEnded
Runner = Callable[..., RunEnded]


@dataclass(frozen=True)
class MemoryNeed:
    """What a config needs, from the engine's memory model (calibrated on measured runs)."""

    vram_bytes: int
    host_bytes: int


# None means "the engine has no measurement for this config": the UI says so and never guesses.
MemoryPredictor = Callable[[Config], MemoryNeed | None]


def _no_prediction(config: Config) -> MemoryNeed | None:
    return None


def engine_memory_predictor() -> MemoryPredictor:
    """`engine.memory.predict(config) -> (vram_bytes, host_bytes)` as the picker's MemoryNeed (imported here, not at
    the top: the memory model is imported only when the Presets screen first asks)."""
    from engine.memory import predict

    def adapter(config: Config) -> MemoryNeed | None:
        try:
            result = predict(config)
        except Exception:  # a model that cannot answer is "not measured", not a crash of the picker
            log.exception("memory model failed")
            return None
        if result is None:
            return None
        vram, host = result
        return MemoryNeed(int(vram), int(host))

    return adapter


def engine_runner() -> Runner:
    """The real training entry point (imported on first use: engine.runner brings torch, which the first paint of
    the app does not need)."""
    from engine.runner import run

    return run


# engine.train.allowed.setting_problems(config, world_size, device) for a run of this app: the messages of the
# settings that cannot run here (empty: all can).
SettingProblems = Callable[[Config], list[str]]


def engine_setting_problems(config: Config) -> list[str]:
    """The engine's one answer to "may these settings run here", asked for the run the app starts: one process, on
    the device the runner picks (engine.runner.pick_device), so the screens refuse what the runner would."""
    from engine.runner import pick_device
    from engine.train.allowed import setting_problems

    return setting_problems(config, 1, pick_device())


def deviceless_setting_problems(config: Config) -> list[str]:
    """The same rules without a device, for the fake engine (`s2v-tui --fake`, the app's tests), which trains on
    none: only the rules that hold on every device apply (engine.train.allowed with device None)."""
    from engine.train.allowed import setting_problems

    return setting_problems(config, 1, None)


def leave_a_core_for_the_ui() -> None:
    """On a CPU-only box, train on one core fewer than there are, from the training thread.

    torch's default (every core) makes its OpenMP workers spin against the event loop: on 2 cores the tiny
    model ran 4x slower in the app than headless and keys took a second to paint. With a GPU the CPU threads
    barely matter, so nothing changes there; a lower count set by the user (OMP_NUM_THREADS) is kept.
    """
    import os

    import torch

    if torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - 1)))


def find_repo_presets() -> Path:
    """presets/ next to the engine package (a source checkout or an editable install): the engine's one locator,
    so the Presets screen and `s2v-tui presets` read the same folder."""
    from engine.presets import PRESETS_DIR

    return PRESETS_DIR


@dataclass
class Services:
    probe: GpuProbe
    runner: Runner | None
    predict_memory: MemoryPredictor = _no_prediction
    host_memory: Callable[[], HostMemory] = host_memory
    presets_dir: Path = field(default_factory=find_repo_presets)
    runs_dir: Path = Path("runs")
    setting_problems: SettingProblems = engine_setting_problems
    # Doctor entry point, swappable so snapshot tests can show a fixed report without decoding video.
    inspect_datasets: Callable[..., Any] | None = None

    def doctor(self) -> Callable[..., Any]:
        if self.inspect_datasets is not None:
            return self.inspect_datasets
        from engine.data.doctor import inspect_datasets

        return inspect_datasets


def default_services(runs_dir: Path = Path("runs")) -> Services:
    return Services(
        probe=default_probe(),
        runner=engine_runner(),
        predict_memory=engine_memory_predictor(),
        runs_dir=runs_dir,
    )

