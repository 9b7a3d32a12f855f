"""Training checkpoints: the full state of a run, written atomically, the last N kept, the newest valid one found.

One checkpoint is one file `run_dir/checkpoints/step-00001234.pt` holding the LoRA, optimizer, scheduler and EMA
states, the step, the epoch and data position, every RNG state (python, numpy, torch CPU and CUDA, and the
loop's own generators) and the config hash. Everything in it is a tensor or a plain Python value, so it loads
with `torch.load(weights_only=True)`: reading a checkpoint never runs pickled code.

A file is written through `fsio.atomic_write_bytes`, so a crash mid-write leaves only a temp file (removed at
the next start) and the previous checkpoint; a failed write (disk full) raises and leaves the older ones intact.
Retention deletes only after a successful write.
"""
from __future__ import annotations

import io
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.train.fsio import atomic_write_bytes, remove_stale_temps

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})\.pt$")
REQUIRED_KEYS = ("format_version", "step", "config_hash", "lora", "optimizer", "scheduler", "rng", "data")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


# ---- RNG states ---------------------------------------------------------------------------------------------
def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG the run touches: globals and the loop's named generators."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine %d: CUDA RNG not restored",
                        len(cuda), torch.cuda.device_count())
    for name, gen in (generators or {}).items():
        saved = state.get("generators", {}).get(name)
        if saved is not None:
            gen.set_state(saved)


# ---- write ----------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` (must hold REQUIRED_KEYS) as the checkpoint of its step; then drop all but the newest
    `keep_last`. Raises OSError if the write fails; older checkpoints are then untouched."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = atomic_write_bytes(checkpoint_path(run_dir, int(state["step"])), buffer.getvalue())
    prune_checkpoints(run_dir, keep_last, protect=path)
    return path


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file by name, newest first (not yet checked for validity)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def prune_checkpoints(run_dir: str | Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    if keep_last < 1:
        return []
    removed = []
    for _, path in list_checkpoints(run_dir)[keep_last:]:
        if path != protect:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ---- read ------------------------------------------------------------------------------------------------------
class InvalidCheckpoint(ValueError):
    pass


def load_checkpoint(path: str | Path, config_hash: str | None = None) -> dict[str, Any]:
    """Read and check one checkpoint; InvalidCheckpoint says why it cannot be used."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn zip, a zero-length file, a bit flip: all mean "not usable"
        raise InvalidCheckpoint(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict):
        raise InvalidCheckpoint(f"{path}: not a checkpoint (a {type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise InvalidCheckpoint(f"{path}: incomplete checkpoint, missing {missing}")
    if state["format_version"] != FORMAT_VERSION:
        raise InvalidCheckpoint(f"{path}: checkpoint format {state['format_version']}, this build reads "
                                f"{FORMAT_VERSION}")
    if config_hash is not None and state["config_hash"] != config_hash:
        raise InvalidCheckpoint(
            f"{path}: written with config {state['config_hash']}, this run's frozen config is {config_hash}; "
            "it belongs to another configuration"
        )
    return state


@dataclass(frozen=True)
class SkippedCheckpoint:
    path: Path
    reason: str


def find_resume_state(run_dir: str | Path, config_hash: str | None = None
                      ) -> tuple[dict[str, Any] | None, Path | None, list[SkippedCheckpoint]]:
    """The newest checkpoint that loads and checks, its path, and the newer ones skipped (with why).

    Temp files of a writer that was killed are removed first."""
    for stale in remove_stale_temps(checkpoint_dir(run_dir)):
        log.info("removed %s, left by an interrupted checkpoint write", stale)
    skipped = []
    for _, path in list_checkpoints(run_dir):
        try:
            return load_checkpoint(path, config_hash), path, skipped
        except InvalidCheckpoint as exc:
            skipped.append(SkippedCheckpoint(path, str(exc)))
    return None, None, skipped
