"""Which preset fits this machine: pure functions over GPU readings and the engine's memory model.

No number is made up here. A preset the memory model has not measured has `need = None` and is shown as
"not measured yet"; the recommendation only ever comes from measured needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config import Config, ConfigError, load_config
from engine.gpu import GpuSnapshot, HostMemory

from s2v_tui.services import MemoryNeed, MemoryPredictor


@dataclass(frozen=True)
class PresetRow:
    name: str
    path: Path
    config: Config | None
    error: str  # why it does not load ("" when it does)
    need: MemoryNeed | None
    fits_gpu: bool | None  # None = unknown (no measurement or no free-memory figure)
    fits_host: bool | None


def load_presets(folder: Path) -> list[tuple[str, Path, Config | None, str]]:
    rows = []
    for path in sorted(folder.glob("*.toml")):
        try:
            rows.append((path.stem, path, load_config(path), ""))
        except ConfigError as exc:
            rows.append((path.stem, path, None, str(exc)))
    return rows


def available_vram(gpus: tuple[GpuSnapshot, ...], override_gb: float | None) -> int | None:
    """Free memory of the emptiest GPU (one GPU is the main case), or the size the user typed."""
    if override_gb is not None:
        return int(override_gb * 1024**3)
    free = [g.free_bytes for g in gpus if g.free_bytes is not None]
    return max(free) if free else None


def evaluate(presets: list[tuple[str, Path, Config | None, str]], predict: MemoryPredictor,
             vram_free: int | None, host: HostMemory | None) -> list[PresetRow]:
    rows = []
    for name, path, config, error in presets:
        need = predict(config) if config is not None else None
        fits_gpu = None if need is None or vram_free is None else need.vram_bytes <= vram_free
        fits_host = None if need is None or host is None else need.host_bytes <= host.available_bytes
        rows.append(PresetRow(name, path, config, error, need, fits_gpu, fits_host))
    return rows


def recommend(rows: list[PresetRow]) -> PresetRow | None:
    """The measured preset that fits both GPU and host and uses the most VRAM (fewer memory savers, faster)."""
    fitting = [r for r in rows if r.fits_gpu and r.fits_host is not False and r.need is not None]
    return max(fitting, key=lambda r: r.need.vram_bytes) if fitting else None  # type: ignore[union-attr]
