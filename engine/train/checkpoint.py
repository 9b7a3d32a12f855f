"""Training checkpoints: the full state of a run, written atomically, verified, pruned only behind a good one.

One checkpoint is `run_dir/checkpoints/step-00001234.pt` holding the LoRA, optimizer, scheduler and EMA states,
the step, the epoch and data position, every RNG state (python, numpy, torch CPU and CUDA, and the loop's own
generators) and the config hashes. Everything in it is a tensor or a plain Python value, so it loads with
`torch.load(weights_only=True)`: reading a checkpoint never runs pickled code.

Beside it, `step-00001234.json` (written first) records its SHA-256, size, whether the state is healthy (every
LoRA tensor finite and no non-finite step streak running), the identity hash and the resolved config; then come
the checkpoint's LoRA files, one per layout of output.formats (`step-00001234_peft.safetensors`, `..._native`),
whose SHA-256 and sizes the record lists too; the .pt is written last, so a .pt on disk always has its record and
its LoRA files. A checkpoint whose bytes no longer match its digest (a bit flip on disk, a torn copy) is never
resumed from: it is moved to `checkpoints/rejected/` with the reason, so it neither deletes anything nor holds a
keep_last slot; a damaged LoRA file of the checkpoint resumed from is moved there alone (the trainer writes it
again from the checkpoint's state).

Writes go through `fsio.atomic_write_bytes` after a free-space check against the exact size of the checkpoint and
its LoRA files; a crash mid-write leaves a temp file (removed at the next start, under the run-folder lock) and the
previous checkpoint. A crash after the LoRA files but before the .pt leaves files of a step without a .pt: they are
complete, so they are left alone, but nothing counts them (only a .pt makes a checkpoint: they are never resumed
from, never take a keep_last slot, never listed) and the resumed run writes that step again over them. A failed
write raises CheckpointWriteError with its cause and removes what it wrote. Pruning by keep_last runs only after
the new checkpoint was read back and verified, and never removes the newest healthy checkpoint.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data.cache import hash_file  # SHA-256 of a file, read in chunks
from engine.fsio import FIXES, atomic_write_bytes, free_bytes, remove_stale_temps, write_error_cause

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})\.pt$")
REQUIRED_KEYS = ("format_version", "step", "config_hash", "lora", "optimizer", "scheduler", "rng", "data")
REJECTED_DIR = "rejected"
SPACE_MARGIN = 64 * 2**20  # besides the checkpoint itself: its digest file, the event log, train.log


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


def digest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def lora_path(path: Path, layout: str) -> Path:
    """The LoRA file in `layout` of the checkpoint at `path`: step-N_LAYOUT.safetensors, a step file of it."""
    return path.with_name(f"{path.stem}_{layout}.safetensors")


def step_files(path: Path) -> list[Path]:
    """Every file of the checkpoint at `path`: step-N.pt, its digest and anything else named step-N.* or
    step-N_* (the files written beside it), so pruning and rejecting move them together."""
    stem = path.stem
    return sorted(p for p in path.parent.iterdir()
                  if p.is_file() and (p.name.startswith(stem + ".") or p.name.startswith(stem + "_")))


def read_digest(path: Path) -> dict[str, Any] | None:
    """The digest record of a checkpoint, or None when it has none (written before digests, or unreadable)."""
    try:
        record = json.loads(digest_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "sha256" in record else None


def _healthy(state: dict[str, Any]) -> bool:
    counters = state.get("counters") or {}
    if int(counters.get("in_a_row", 0)):
        return False
    return all(bool(torch.isfinite(t).all()) for t in state["lora"].values() if torch.is_tensor(t))


_ERRNO = {"no_space": errno.ENOSPC, "missing_folder": errno.ENOENT, "read_only": errno.EROFS,
          "permission": errno.EACCES, "io": errno.EIO}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; `cause` is one of fsio.FIXES ("no_space", "read_only", ...)."""

    def __init__(self, path: Path, cause: str, detail: str, code: int = 0) -> None:
        super().__init__(code or _ERRNO.get(cause, 0), detail)
        self.path, self.cause, self.detail = path, cause, detail

    def __str__(self) -> str:
        return f"could not write {self.path}: {self.detail} ({FIXES[self.cause]})"


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
def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep_last: int,
                    extra: dict[str, Any] | None = None, loras: Mapping[str, bytes] | None = None) -> Path:
    """Write `state` (must hold REQUIRED_KEYS) as the checkpoint of its step with its LoRA files (`loras`: layout
    -> the bytes of the file, see engine.train.export), verify them, then prune to the newest `keep_last`
    (keeping the newest healthy one too). `extra`: more fields for the digest record (the resolved config, the
    loss). Raises CheckpointWriteError; older checkpoints are then untouched."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir, int(state["step"]))
    if not run_dir.is_dir():  # never recreate a run folder that vanished: its history is gone with it
        raise CheckpointWriteError(path, "missing_folder", f"the run folder {run_dir} no longer exists")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    loras = dict(loras or {})
    record = {"step": int(state["step"]), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
              "healthy": _healthy(state), "identity": state.get("identity", ""),
              "config_hash": state["config_hash"], "loras": _lora_records(path, loras), **(extra or {})}
    written: list[Path] = []
    try:
        path.parent.mkdir(exist_ok=True)
        _require_space(path, len(data) + sum(len(blob) for blob in loras.values()))
        # The digest first, the .pt last: a step-N.pt on disk then always has the record to check it against
        # and its LoRA files.
        written.append(atomic_write_bytes(digest_path(path), _record_bytes(record)))
        for layout, blob in loras.items():
            written.append(atomic_write_bytes(lora_path(path, layout), blob))
        atomic_write_bytes(path, data)
    except CheckpointWriteError:
        raise
    except OSError as exc:
        if not path.exists():  # the files of a checkpoint that never came would only mislead a reader
            for file in written:
                try:
                    file.unlink(missing_ok=True)
                except OSError:
                    pass  # a read-only disk: they stay, and nothing counts them without their .pt
        cause, text = write_error_cause(exc)
        raise CheckpointWriteError(path, cause, text, exc.errno or 0) from exc
    del buffer, data
    # Read back: what is pruned below is only ever behind a good checkpoint with good LoRA files.
    if hash_file(path) != record["sha256"]:
        raise CheckpointWriteError(path, "io", "the file read back differs from what was written")
    problems = lora_problems(path, record)
    if problems:
        layout, problem = next(iter(problems.items()))
        raise CheckpointWriteError(lora_path(path, layout), "io", f"read back: {problem}")
    prune_checkpoints(run_dir, keep_last, protect=path)
    return path


def _lora_records(path: Path, loras: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    return {layout: {"file": lora_path(path, layout).name, "sha256": hashlib.sha256(blob).hexdigest(),
                     "bytes": len(blob)} for layout, blob in loras.items()}


def _record_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=1).encode("utf-8")


def _require_space(path: Path, size: int) -> None:
    free = free_bytes(path.parent)
    if free is not None and free < size + SPACE_MARGIN:
        raise CheckpointWriteError(path, "no_space", (
            f"no space for it: it needs {_size(size + SPACE_MARGIN)} and the disk has {_size(free)} free"))


def lora_problems(path: Path, record: dict[str, Any] | None = None, verify: bool = True) -> dict[str, str]:
    """layout -> what is wrong with a LoRA file that the record of the checkpoint at `path` lists (missing, another
    size, other bytes); {} when each is as written. `verify=False` compares sizes only (no file is read)."""
    record = record if record is not None else (read_digest(path) or {})
    problems = {}
    for layout, entry in (record.get("loras") or {}).items():
        file = lora_path(path, layout)
        try:
            size = file.stat().st_size
        except OSError:
            problems[layout] = f"{file.name} is missing"
            continue
        if size != entry.get("bytes"):
            problems[layout] = f"{file.name} has {size} bytes, its checkpoint's record says {entry.get('bytes')}"
        elif verify and hash_file(file) != entry.get("sha256"):
            problems[layout] = (f"the bytes of {file.name} changed since it was written (its SHA-256 differs from "
                                "its checkpoint's record): damaged on disk or in a copy")
    return problems


def add_loras(path: Path, loras: Mapping[str, bytes]) -> None:
    """Write LoRA files for the existing checkpoint at `path` (the layouts it lacks, or one set aside as damaged)
    and add them to its record. The files come first: a crash before the record is rewritten leaves a file the
    record does not vouch for, which the next start sets aside and writes again."""
    record = read_digest(path)
    if record is None or not loras:
        return
    try:
        _require_space(path, sum(len(blob) for blob in loras.values()))
        for layout, blob in loras.items():
            atomic_write_bytes(lora_path(path, layout), blob)
        record["loras"] = {**(record.get("loras") or {}), **_lora_records(path, loras)}
        atomic_write_bytes(digest_path(path), _record_bytes(record))
    except CheckpointWriteError:
        raise
    except OSError as exc:
        cause, text = write_error_cause(exc)
        raise CheckpointWriteError(path, cause, text, exc.errno or 0) from exc


def _size(n: int) -> str:
    # MiB below a GiB: "0.00 GiB free" would hide the few MiB a small disk still has.
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


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


def newest_healthy(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose digest record says it is healthy (one without a record counts as healthy:
    it was written before records existed, when a non-finite state could not be saved)."""
    for _, path in list_checkpoints(run_dir):
        record = read_digest(path)
        if record is None or record.get("healthy", True):
            return path
    return None


def prune_checkpoints(run_dir: str | Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Remove all but the newest `keep_last` checkpoints, never `protect` nor the newest healthy one."""
    if keep_last < 1:
        return []
    keep = {protect, newest_healthy(run_dir)}
    removed = []
    for _, path in list_checkpoints(run_dir)[keep_last:]:
        if path in keep:
            continue
        for file in step_files(path):
            file.unlink(missing_ok=True)
            removed.append(file)
    return removed


def reject_checkpoint(path: Path, reason: str) -> Path:
    """Move a checkpoint that cannot be used (and its files) to checkpoints/rejected/, with the reason beside it."""
    return _set_aside(step_files(path), path, path.stem, reason)


def reject_file(file: Path, reason: str) -> Path:
    """Move one damaged file of a good checkpoint (a LoRA file) to checkpoints/rejected/, with the reason."""
    return _set_aside([file], file, file.name, reason)


def _set_aside(files: list[Path], main: Path, name: str, reason: str) -> Path:
    folder = main.parent / REJECTED_DIR
    folder.mkdir(exist_ok=True)
    for file in files:
        os.replace(file, folder / file.name)
    try:  # renames need no space; the reason file does, and a full disk must not stop the resume here
        atomic_write_bytes(folder / f"{name}.reason.txt", (reason + "\n").encode("utf-8"))
    except OSError as exc:
        log.warning("moved %s to %s but could not write why there (%s): %s", main.name, folder,
                    exc.strerror or exc, reason)
    return folder / main.name


def space_shortfall(run_dir: str | Path, like: Path) -> str:
    """"" when the disk has room for one more checkpoint the size of `like`, else what is short. A resumed run
    asks before loading its model: its first checkpoint would fail anyway, after all the steps up to it."""
    record = read_digest(like) or {}
    try:
        size = int(record.get("bytes") or like.stat().st_size)
    except OSError:
        return ""
    size += sum(int(entry.get("bytes", 0)) for entry in (record.get("loras") or {}).values())
    free = free_bytes(checkpoint_dir(run_dir))
    if free is None or free >= size + SPACE_MARGIN:
        return ""
    return f"no space for the next checkpoint: it needs {_size(size + SPACE_MARGIN)} and the disk has {_size(free)} free"


# ---- read ------------------------------------------------------------------------------------------------------
class InvalidCheckpoint(ValueError):
    """Why a checkpoint cannot be resumed from; `corrupt` when its bytes are damaged (then it is moved aside)
    rather than written by another configuration or build (then it is left alone)."""

    def __init__(self, message: str, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


def load_checkpoint(path: str | Path, config_hash: str | None = None, identity: str | None = None
                    ) -> dict[str, Any]:
    """Read, verify and check one checkpoint; InvalidCheckpoint says why it cannot be used.

    `identity` (engine.config.identity_hash) must match the checkpoint's; a checkpoint written before identities
    existed (or a caller without one) is matched on the full `config_hash` instead."""
    path = Path(path)
    record = read_digest(path)
    if record is not None:
        try:
            actual = hash_file(path)
        except OSError as exc:
            raise InvalidCheckpoint(f"{path}: unreadable ({exc.strerror or exc})", corrupt=True) from None
        if actual != record["sha256"]:
            raise InvalidCheckpoint(f"{path}: its bytes changed since it was written (SHA-256 {actual[:12]}..., "
                                    f"recorded {record['sha256'][:12]}...): damaged on disk or in a copy",
                                    corrupt=True)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn zip, a zero-length file, a bit flip: all mean "not usable"
        raise InvalidCheckpoint(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})",
                                corrupt=True) from None
    if not isinstance(state, dict):
        raise InvalidCheckpoint(f"{path}: not a checkpoint (a {type(state).__name__})", corrupt=True)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise InvalidCheckpoint(f"{path}: incomplete checkpoint, missing {missing}", corrupt=True)
    if state["format_version"] != FORMAT_VERSION:
        raise InvalidCheckpoint(f"{path}: checkpoint format {state['format_version']}, this build reads "
                                f"{FORMAT_VERSION}")
    use_identity = identity is not None and "identity" in state
    theirs, ours = (state["identity"], identity) if use_identity else (state["config_hash"], config_hash)
    if ours is not None and theirs != ours:
        raise InvalidCheckpoint(f"{path}: written with config {theirs}, this run's config is {ours}; it belongs "
                                "to another configuration")
    return state


@dataclass(frozen=True)
class SkippedCheckpoint:
    path: Path
    reason: str
    what: str = "checkpoint"  # or "checkpoint LoRA file": one set aside from the checkpoint resumed from


def find_resume_state(run_dir: str | Path, config_hash: str | None = None, identity: str | None = None,
                      keep_last: int = 0, tidy: bool = True
                      ) -> tuple[dict[str, Any] | None, Path | None, list[SkippedCheckpoint]]:
    """The newest checkpoint that loads and checks, its path, and the newer ones skipped (with why).

    Call it only while holding the run-folder lock: temp files of a writer that was killed are removed first,
    damaged checkpoints are moved to checkpoints/rejected/, and with `keep_last` the checkpoints beyond it
    (left by a run aborted between its write and its pruning) are pruned behind the verified one. `tidy=False`
    (ranks other than 0 of a multi-process run) only reads."""
    for stale in remove_stale_temps(checkpoint_dir(run_dir)) if tidy else ():
        log.info("removed %s, left by an interrupted checkpoint write", stale)
    skipped = []
    for _, path in list_checkpoints(run_dir):
        try:
            state = load_checkpoint(path, config_hash, identity)
        except InvalidCheckpoint as exc:
            reason = str(exc)
            if exc.corrupt and tidy:
                try:
                    moved = reject_checkpoint(path, reason)
                    reason += f"; moved to {moved.parent}"
                except OSError as err:  # a read-only disk: skipped all the same, moved at a later start
                    reason += f"; it could not be moved aside ({err.strerror or err}) and stays"
            skipped.append(SkippedCheckpoint(path, reason))
            continue
        if tidy:  # the other ranks of a run neither move files nor report
            skipped += _damaged_loras(path)
        if keep_last:
            prune_checkpoints(run_dir, keep_last, protect=path)
        return state, path, skipped
    return None, None, skipped


def _damaged_loras(path: Path) -> list[SkippedCheckpoint]:
    """The LoRA files of the checkpoint resumed from that do not match its record, moved aside: its state is
    good, and the trainer writes them again from it (Trainer.complete_checkpoint_loras)."""
    found = []
    for layout, problem in lora_problems(path).items():
        file = lora_path(path, layout)
        reason = f"{problem} (checkpoint of step {int(path.stem.split('-')[1])})"
        if file.exists():
            try:
                reason += f"; moved to {reject_file(file, reason).parent}, and written again from the checkpoint"
            except OSError as err:
                reason += f"; it could not be moved aside ({err.strerror or err}) and stays"
        found.append(SkippedCheckpoint(file, reason, what="checkpoint LoRA file"))
    return found
