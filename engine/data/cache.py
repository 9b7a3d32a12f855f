"""Content-addressed store of encoder outputs (VAE latents, UMT5 states, wav2vec2 features) as safetensors.

An entry's key is the SHA-256 of its *recipe*: a small JSON-able dict naming everything that decides the
result: the entry kind, the content hash of each source file (never its path or mtime), the identity of
the encoder that made it (a hash of its whole model folder), and every setting (bucket, crop, window start
and length, motion frames, reference frame, dtypes). A changed clip, encoder or setting therefore gives a
new key, and only entries whose recipe changed are recomputed; an entry made for another model or setting
can never be found under the current recipe, so it is never silently reused.

Layout under the cache folder:
    entries/<kind>/<key[:2]>/<key>.safetensors   one entry; its metadata repeats the kind, key and recipe and
                                                 holds a digest of the tensors, checked on every read
    index/file_hashes.json                       memo of content hashes by (path, size, mtime_ns), so a
                                                 rescan re-hashes only files that changed

Writes are atomic: the bytes go to a temporary file in the entry's folder, are fsynced, then renamed over
the final name (and the folder is fsynced), so a reader sees either no entry or a whole one. A reader still
verifies what it reads (header, recipe key, tensor digest): a damaged entry raises CacheEntryError and
`has(..., verify=True)` reports it missing, so the filler recomputes it instead of training on it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from engine.fsio import fsync_dir, mkstemp_shared  # one folder-fsync and file mode for checkpoints and cache

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the meaning of an entry changes; it is part of every key
ENTRY_SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
_HASH_CHUNK = 8 << 20
_TEMP_MAX_AGE_S = 3600.0  # temporary files older than this were left by a killed writer


class CacheEntryError(Exception):
    """A cache entry that cannot be used: the message names the file and the fix."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}; run `s2v-tui cache PRESET.toml` to rebuild it (a damaged "
                         f"entry is recomputed, nothing else needs to be deleted)")


def recipe_key(recipe: Mapping[str, Any]) -> str:
    """Stable key of a recipe: SHA-256 of its canonical JSON (sorted keys, no spaces), with the format."""
    text = json.dumps({"format": CACHE_FORMAT, **recipe}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order (independent of the file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_temp(folder: Path, data: bytes) -> Path:
    """Write `data` to a new temporary file in `folder` and fsync it; the caller renames it into place."""
    fd, name = mkstemp_shared(folder, TEMP_PREFIX, ".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def commit_temp(temp: Path, final: Path) -> None:
    """Atomically put a finished temporary file at its final name (same folder, so rename is atomic)."""
    os.replace(temp, final)
    fsync_dir(final.parent)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = write_temp(final.parent, data)
    try:
        commit_temp(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _read_header(data: bytes, path: Path) -> dict[str, Any]:
    if len(data) < 8:
        raise CacheEntryError(path, "the file is truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CacheEntryError(path, "the file is truncated (header longer than the file)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheEntryError(path, f"the safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CacheEntryError(path, "the safetensors header is not an object")
    return header


class FileHashIndex:
    """Content hashes of source files, memoised by (resolved path, size, mtime_ns) in a JSON file.

    Touching a file (new mtime, same bytes) costs one re-hash and yields the same hash, so nothing that
    depends on it is recomputed; changing its bytes yields a new hash. Safe to share between threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._dirty = False
        self._entries: dict[str, dict[str, Any]] = {}
        self.hashed: list[Path] = []  # files actually read this session (tests and logs use it)
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(raw, dict) and raw.get("format") == CACHE_FORMAT and isinstance(raw.get("files"), dict):
                self._entries = raw["files"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("file hash index %s unreadable (%s); files will be re-hashed", self.path, exc)

    def digest(self, path: Path | str) -> str:
        p = Path(path).resolve()
        try:
            st = os.stat(p)
        except OSError as exc:
            raise FileNotFoundError(f"{path}: cannot read it to hash its content ({exc.strerror}); check that "
                                    f"the file still exists") from exc
        sig = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        key = str(p)
        with self._lock:
            known = self._entries.get(key)
            if known and known.get("size") == sig["size"] and known.get("mtime_ns") == sig["mtime_ns"]:
                return known["sha256"]
        digest = hash_file(p)
        # A file rewritten while we read it would be hashed with a stale signature; re-check it.
        st2 = os.stat(p)
        if (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise RuntimeError(f"{path}: the file changed while it was being hashed; wait until it is "
                               f"fully written, then run again")
        with self._lock:
            self._entries[key] = {**sig, "sha256": digest}
            self._dirty = True
            self.hashed.append(p)
        return digest

    def save(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            data = json.dumps({"format": CACHE_FORMAT, "files": self._entries}, sort_keys=True).encode()
            self._dirty = False
        atomic_write_bytes(self.path, data)


class CacheStore:
    """The entries of one cache folder: keyed writes and verified reads."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.entries = self.root / "entries"
        self.files = FileHashIndex(self.root / "index" / "file_hashes.json")
        self.written: list[tuple[str, str]] = []  # (kind, key) written by this store (logs and tests)

    def path_for(self, kind: str, key: str) -> Path:
        if not kind.isidentifier() or len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"bad cache entry name {kind!r}/{key!r}")
        return self.entries / kind / key[:2] / f"{key}{ENTRY_SUFFIX}"

    # ------------------------------------------------------------------------------------------------
    # identities

    def file_digest(self, path: Path | str) -> str:
        return self.files.digest(path)

    def folder_identity(self, folder: Path | str) -> str:
        """Identity of a model component folder: every file's relative name and content hash.

        Weights are hashed once (then memoised by size and mtime), so two checkpoints with the same
        configuration but different weights (a fine-tune, another seed) never share cache entries.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: model component folder not found; check model.source")
        h = hashlib.sha256()
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            h.update(f"{rel.as_posix()}={self.files.digest(p)}\n".encode())
        return h.hexdigest()

    # ------------------------------------------------------------------------------------------------
    # entries

    def write(self, kind: str, key: str, tensors: Mapping[str, torch.Tensor],
              recipe: Mapping[str, Any] | None = None, meta: Mapping[str, str] | None = None) -> Path:
        """Store `tensors` under (kind, key) atomically; `meta` holds small string facts (token length)."""
        from safetensors.torch import save

        final = self.path_for(kind, key)
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        metadata = {"s2v_cache_format": str(CACHE_FORMAT), "kind": kind, "key": key,
                    "recipe": json.dumps(recipe or {}, sort_keys=True), "digest": tensors_digest(cpu),
                    **{f"meta.{k}": str(v) for k, v in (meta or {}).items()}}
        atomic_write_bytes(final, save(cpu, metadata=metadata))
        self.written.append((kind, key))
        return final

    def read(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and meta of an entry, verified. Raises FileNotFoundError or CacheEntryError."""
        from safetensors.torch import load

        path = self.path_for(kind, key)
        data = path.read_bytes()  # FileNotFoundError propagates: a missing entry is not a damaged one
        meta = _read_header(data, path).get("__metadata__") or {}
        if meta.get("s2v_cache_format") != str(CACHE_FORMAT) or meta.get("kind") != kind or meta.get("key") != key:
            raise CacheEntryError(path, "the entry's metadata does not match its name (another format or a "
                                        "copied file)")
        try:
            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error type for damaged data
            raise CacheEntryError(path, f"the tensors cannot be read ({exc})") from exc
        if tensors_digest(tensors) != meta.get("digest"):
            raise CacheEntryError(path, "the tensor data does not match its digest (damaged file)")
        return tensors, {k[5:]: v for k, v in meta.items() if k.startswith("meta.")}

    def has(self, kind: str, key: str, *, verify: bool = False) -> bool:
        """Whether a usable entry exists. Without `verify` only the header is checked (cheap); with it the
        whole entry is read and its digest checked. A damaged entry is removed so it gets recomputed."""
        path = self.path_for(kind, key)
        try:
            if verify:
                self.read(kind, key)
            else:
                with open(path, "rb") as f:
                    head = f.read(8)
                    if len(head) < 8:
                        raise CacheEntryError(path, "the file is truncated")
                    (n,) = struct.unpack("<Q", head)
                    header = _read_header(head + f.read(n), path)
                    meta = header.get("__metadata__") or {}
                    if meta.get("key") != key or meta.get("kind") != kind:
                        raise CacheEntryError(path, "the entry's metadata does not match its name")
                    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                    if os.fstat(f.fileno()).st_size < 8 + n + max(ends, default=0):
                        raise CacheEntryError(path, "the file is truncated (tensor data missing)")
            return True
        except FileNotFoundError:
            return False
        except (CacheEntryError, KeyError, TypeError) as exc:
            log.warning("damaged cache entry, it will be recomputed: %s", exc)
            path.unlink(missing_ok=True)
            return False

    def remove_stale_temps(self, max_age_s: float = _TEMP_MAX_AGE_S) -> int:
        """Delete temporary files left by writers that were killed (older than `max_age_s`)."""
        if not self.entries.is_dir():
            return 0
        now, removed = time.time(), 0
        for p in self.entries.rglob(f"{TEMP_PREFIX}*"):
            try:
                if now - p.stat().st_mtime > max_age_s:
                    p.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    def keys(self, kind: str) -> set[str]:
        folder = self.entries / kind
        if not folder.is_dir():
            return set()
        return {p.name[: -len(ENTRY_SUFFIX)] for p in folder.glob(f"*/*{ENTRY_SUFFIX}")}

    def prune(self, live: Mapping[str, set[str]]) -> int:
        """Delete entries of the given kinds whose key is not in `live[kind]`; returns how many."""
        removed = 0
        for kind, keep in live.items():
            for key in self.keys(kind) - keep:
                self.path_for(kind, key).unlink(missing_ok=True)
                removed += 1
        return removed
