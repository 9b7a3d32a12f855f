"""Crash-safe file writes: temp file in the same folder, fsync, rename over the target, fsync the folder.

At the bottom of the engine (it imports nothing of it): config files, cache entries, checkpoints and exported
LoRAs are all written here, so each gets the same guarantees and the same error causes.

A reader sees either the old file or the whole new one, never a torn one, even after a power loss or SIGKILL;
a write that fails (disk full) removes its temp file and leaves the previous file as it was.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"

# errno -> (cause, what to tell the user). A full disk and a read-only folder need different fixes.
_CAUSES = {
    errno.ENOSPC: ("no_space", "no space left on the device"),
    errno.EDQUOT: ("no_space", "the disk quota is used up"),
    errno.EROFS: ("read_only", "the filesystem is read-only"),
    errno.EACCES: ("permission", "permission denied"),
    errno.EPERM: ("permission", "the operation is not permitted"),
    errno.ENOENT: ("missing_folder", "the folder no longer exists"),
    errno.ENOTDIR: ("missing_folder", "a folder on the path is not a folder"),
}
FIXES = {
    "no_space": "free disk space there",
    "read_only": "remount it read-write or copy the run folder to a writable disk and pass --run-dir",
    "permission": "give this user write access to the folder",
    "missing_folder": "restore the run folder (was its disk unmounted?)",
    "io": "check the disk",
}


def write_error_cause(exc: OSError) -> tuple[str, str]:
    """(cause, description) of a failed write: one of the FIXES keys and a phrase for a person."""
    cause, text = _CAUSES.get(exc.errno or 0, ("io", exc.strerror or str(exc)))
    return cause, text


def free_bytes(folder: str | os.PathLike[str]) -> int | None:
    """Bytes a non-root writer may still use in `folder`'s filesystem; None when it cannot be read."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _umask() -> int:
    """The process umask, read where Linux shows it (os.umask can only read it by setting it, which races with
    other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mkstemp_shared(folder: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """tempfile.mkstemp, but the file gets the mode a plain open() would give it (0666 less the umask).

    mkstemp makes every file 0600 because a temp file may be secret; ours are renamed into place as the run's
    outputs (checkpoints, LoRAs, configs, cache entries), which the user's group and other tools must read too.
    """
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError:
        pass  # a filesystem without modes (some mounts): the file stays as mkstemp made it
    return fd, name


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
    fd, tmp = mkstemp_shared(path.parent, f".{path.name}.", TEMP_SUFFIX)
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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`atomic_write_bytes` of `text` in UTF-8 (config files, manifests)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files a killed writer left behind in `folder`; returns what was removed."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(f".*{TEMP_SUFFIX}"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
