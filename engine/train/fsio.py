"""Crash-safe file writes: temp file in the same folder, fsync, rename over the target, fsync the folder.

A reader sees either the old file or the whole new one, never a torn one, even after a power loss or SIGKILL;
a write that fails (disk full) removes its temp file and leaves the previous file as it was.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte to `fd` (os.write may write less than asked). Tests patch this to simulate ENOSPC."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(folder: Path) -> None:
    # The rename is only durable once the folder's entry is on disk. Some filesystems refuse fsync on a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files a killed writer left behind in `folder`; returns what was removed."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(f".*{TEMP_SUFFIX}"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
