"""Which preset: where the shipped presets are, which of them fits a machine, and what to pick instead.

engine.memory says how much memory a config needs; this module turns those needs into a choice. It is the one
rule behind `s2v-tui presets`, the Presets screen (through s2v_tui.app_logic.presets_logic), the runner's memory
pre-flight and its out-of-memory hint, and the host-RAM guard's lighter-preset suggestion.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.config import Config, ConfigError, load_config
from engine.memory import GIB, MemoryEstimate, estimate, predict

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
# Every key's default, which the presets extend: a file to start from, not a preset to pick.
BASE_PRESET = "base.toml"
# The card classes the shipped presets are named by (24gb.toml, ...), smallest first.
MEMORY_CLASSES_GB = (24, 32, 48, 80)


# ---- where they are ---------------------------------------------------------------------------------------------
def preset_files(folder: Path = PRESETS_DIR) -> list[Path]:
    """The preset files of a folder: every TOML file but the base one, by name."""
    return sorted(p for p in folder.glob("*.toml") if p.name != BASE_PRESET)


def load_presets(folder: Path = PRESETS_DIR) -> list[tuple[str, Path, Config | None, str]]:
    """(name, path, config, error) of every preset file of `folder`: the config when it loads (error ""), else
    None and the ConfigError's message, so a picker can show a broken preset with its reason."""
    rows = []
    for path in preset_files(folder):
        try:
            rows.append((path.stem, path, load_config(path), ""))
        except ConfigError as exc:
            rows.append((path.stem, path, None, str(exc)))
    return rows


def shipped_presets(folder: Path = PRESETS_DIR) -> dict:
    """The presets of `folder` that load, by name (`load_presets` without the broken ones)."""
    return {name: config for name, _, config, _ in load_presets(folder) if config is not None}


# ---- which one fits ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PresetFit:
    """One preset's predicted needs against a machine. fits_* are None where that side is not known."""
    name: str
    gpu_bytes: int  # what the card must have free
    host_bytes: int
    fits_gpu: bool | None
    fits_host: bool | None

    @property
    def fits(self) -> bool | None:
        if self.fits_gpu is False or self.fits_host is False:
            return False
        return None if self.fits_gpu is None or self.fits_host is None else True


@dataclass(frozen=True)
class PresetChoice:
    best: str | None  # the preset to pick; None when none fits or the card is not known
    rows: tuple[PresetFit, ...]
    short: str = ""  # when none fits: "host" (host RAM) or "gpu" (GPU memory)
    short_preset: str = ""  # the preset that came closest
    short_bytes: int = 0  # how much more that preset needs than there is
    why_none: str = ""  # one sentence saying what is short, for which preset, by how much


def card_class_gib(name: str, gpu_bytes: int) -> float:
    """The card a preset is for, from its name ("24gb", "24gb-lowram": 24); else its own GPU need."""
    match = re.match(r"(\d+)gb", name)
    return float(match.group(1)) if match else gpu_bytes / GIB


def preset_needs(presets: dict[str, object]) -> list[tuple[str, int, int]]:
    """(name, GPU bytes, host bytes) of each preset config, from the memory model."""
    return [(name, *predict(cfg)) for name, cfg in presets.items()]


def choose_preset(needs, vram_bytes: int | None, host_bytes: int | None) -> PresetChoice:
    """Among the presets predicted to fit both the card (`vram_bytes` free) and the host (`host_bytes`
    available), the one for the largest card class: it keeps the most on the GPU, so it is the fastest. Within a
    class the one that needs the most host RAM wins (a low-RAM variant trades speed for host memory, so it is
    only picked where the main one does not fit). `needs`: (name, GPU bytes, host bytes). None for either side
    means not known: nothing is recommended without the card's size, since every preset would "fit" it."""
    rows = tuple(PresetFit(name, int(gpu), int(host),
                           None if vram_bytes is None else gpu <= vram_bytes,
                           None if host_bytes is None else host <= host_bytes) for name, gpu, host in needs)
    if vram_bytes is None or not rows:
        return PresetChoice(None, rows)
    fitting = [r for r in rows if r.fits is not False]
    if fitting:
        best = max(fitting, key=lambda r: (card_class_gib(r.name, r.gpu_bytes), r.host_bytes, r.gpu_bytes))
        return PresetChoice(best.name, rows)
    gpu_ok = [r for r in rows if r.fits_gpu]
    if gpu_ok and host_bytes is not None:
        r = min(gpu_ok, key=lambda r: r.host_bytes)
        short = r.host_bytes - host_bytes
        why = (f"no preset fits: host RAM is short. {r.name} fits this card ({r.gpu_bytes / GIB:.1f} GiB of GPU "
               f"memory) but needs {r.host_bytes / GIB:.1f} GiB of host RAM, {host_bytes / GIB:.1f} GiB are "
               f"available: {short / GIB:.1f} GiB short. Free host RAM (close other programs) or use a host with more")
        return PresetChoice(None, rows, "host", r.name, short, why)
    r = min(rows, key=lambda r: r.gpu_bytes)
    short = r.gpu_bytes - vram_bytes
    why = (f"no preset fits: GPU memory is short. The smallest, {r.name}, needs {r.gpu_bytes / GIB:.1f} GiB of GPU "
           f"memory, {vram_bytes / GIB:.1f} GiB are free: {short / GIB:.1f} GiB short. Free GPU memory (other "
           "processes) or train fewer frames / a smaller resolution")
    return PresetChoice(None, rows, "gpu", r.name, short, why)


def recommend(presets: dict[str, object], free_vram_bytes: int | None,
              host_available_bytes: int | None) -> str | None:
    """The preset to pick for this card and host (`choose_preset`), or None."""
    return choose_preset(preset_needs(presets), free_vram_bytes, host_available_bytes).best


def less_host_ram_preset(config, presets: dict[str, object], vram_bytes: int | None = None) -> tuple[str, int] | None:
    """(name, host bytes) of the preset that needs the least host RAM, less than `config` does, among those that
    fit the card: `vram_bytes` free, or when that is not known, no more GPU memory than `config` needs (so it
    fits wherever `config` fits). None when no preset needs less."""
    gpu_need, host_need = predict(config)
    limit = vram_bytes if vram_bytes is not None else gpu_need
    lighter = [(host, name) for name, gpu, host in preset_needs(presets) if gpu <= limit and host < host_need]
    return (min(lighter)[1], min(lighter)[0]) if lighter else None

# ---- what to do when a config does not fit ---------------------------------------------------------------------
class PreflightError(RuntimeError):
    pass


def preflight(config, free_vram_bytes: int | None, host_available_bytes: int | None,
              presets: dict[str, object] | None = None) -> MemoryEstimate:
    """Refuse, before any weight is loaded, a config predicted not to fit; name the preset to pick instead."""
    est = estimate(config)
    problems = []
    if free_vram_bytes is not None and est.vram_need_bytes > free_vram_bytes:
        problems.append(f"needs about {est.vram_need_bytes / GIB:.1f} GiB of GPU memory, "
                        f"{free_vram_bytes / GIB:.1f} GiB are free")
    if host_available_bytes is not None and est.host_bytes > host_available_bytes:
        problems.append(f"needs about {est.host_bytes / GIB:.1f} GiB of host RAM, "
                        f"{host_available_bytes / GIB:.1f} GiB are available")
    if problems:
        hint = ""
        if presets:
            choice = choose_preset(preset_needs(presets), free_vram_bytes, host_available_bytes)
            hint = (f" Pick the preset {choice.best!r} instead (`extends` it in your config)." if choice.best
                    else f" {choice.why_none[0].upper()}{choice.why_none[1:]}." if choice.why_none
                    else " No shipped preset fits this machine.")
        raise PreflightError(f"this config {' and '.join(problems)}.{hint}")
    return est


def smaller_preset_hint(config: Config, device) -> str:
    """After an out-of-memory error: name the preset one card class below the memory this run had."""
    if config.memory.vram_budget_gb > 0:
        budget = config.memory.vram_budget_gb
    elif device.type == "cuda":
        import torch  # only here: the rest of this module is read without torch (the presets command)

        budget = torch.cuda.get_device_properties(device).total_memory / 1e9
    else:
        budget = 0.0
    current = [c for c in MEMORY_CLASSES_GB if c <= budget + 1]
    below = [c for c in MEMORY_CLASSES_GB if current and c < current[-1]]
    if below:
        return (f"try presets/{below[-1]}gb.toml (the preset one memory class below this {budget:.0f} GB "
                "budget), or lower data.resolution / optim.batch_size")
    return "lower data.resolution, optim.batch_size or lora.rank, and keep memory.gradient_checkpointing on"
