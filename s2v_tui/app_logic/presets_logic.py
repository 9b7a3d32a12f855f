"""Which preset fits this machine: the screen's rows over GPU readings, host RAM and the engine's memory model.

No number is made up here. A preset the memory model has not measured has `need = None` and is shown as
"not measured yet"; the recommendation only ever comes from measured needs, and the rule that picks it is the
engine's (`engine.presets.choose_preset`), the same one `s2v-tui presets` and the pre-flight check use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config import Config
from engine.gpu import GpuSnapshot, HostMemory
# load_presets is the engine's (where presets are and how a broken one is reported); the screen imports it here.
from engine.presets import PresetChoice, choose_preset, load_presets  # noqa: F401

from s2v_tui.services import MemoryNeed, MemoryPredictor

GIB = 2**30


@dataclass(frozen=True)
class PresetRow:
    name: str
    path: Path
    config: Config | None
    error: str  # why it does not load ("" when it does)
    need: MemoryNeed | None
    fits_gpu: bool | None  # None = unknown (no measurement or no free-memory figure)
    fits_host: bool | None


def available_vram(gpus: tuple[GpuSnapshot, ...], override_gb: float | None) -> int | None:
    """Free memory of the emptiest GPU (one GPU is the main case), or the size the user typed."""
    if override_gb is not None:
        return int(override_gb * GIB)
    free = [g.free_bytes for g in gpus if g.free_bytes is not None]
    return max(free) if free else None


def available_host(host: HostMemory | None, override_gb: float | None) -> int | None:
    """Host RAM available now, or the size the user typed (to plan for another host)."""
    if override_gb is not None:
        return int(override_gb * GIB)
    return host.available_bytes if host is not None else None


def evaluate(presets: list[tuple[str, Path, Config | None, str]], predict: MemoryPredictor,
             vram_free: int | None, host_available: int | None) -> tuple[list[PresetRow], PresetChoice]:
    """One row per preset, and the engine's choice among the measured ones."""
    needs = {name: predict(config) if config is not None else None for name, _, config, _ in presets}
    choice = choose_preset([(n, need.vram_bytes, need.host_bytes) for n, need in needs.items() if need is not None],
                           vram_free, host_available)
    fits = {f.name: f for f in choice.rows}
    rows = []
    for name, path, config, error in presets:
        fit = fits.get(name)
        rows.append(PresetRow(name, path, config, error, needs[name], fit.fits_gpu if fit else None,
                              fit.fits_host if fit else None))
    return rows, choice


def recommend(rows: list[PresetRow], choice: PresetChoice | None = None) -> PresetRow | None:
    """The row of the preset the engine picked."""
    best = choice.best if choice is not None else None
    return next((r for r in rows if r.name == best), None)
