"""Hand host memory that a finished phase freed back to the system before training starts.

Freeing a tensor does not shrink the process: glibc keeps freed heap chunks (every tensor under its mmap threshold,
up to 32 MiB, comes from the heap) for reuse, and torch's pinned-memory allocator keeps freed pinned blocks cached.
The cache phase's encoders and the validation set-up leave both behind; on a host sized for the training step
alone that is the difference between a run and the kernel's OOM killer. `release_host_memory` runs the garbage
collector, empties torch's CUDA and pinned caches and asks glibc to return free heap pages (malloc_trim), then
logs the resident memory before and after, so train.log shows what each phase left.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

import torch

from engine.gpu import host_memory

log = logging.getLogger(__name__)
_GIB = 2**30


def _malloc_trim() -> bool:
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def release_host_memory(after: str) -> tuple[int, int]:
    """Free what `after` (a phase name, for the log) left cached; returns the process RSS before and after."""
    before = host_memory().process_rss_bytes
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch._C._host_emptyCache()  # pinned blocks freed by the phase are cached, not returned, until this
    _malloc_trim()
    now = host_memory().process_rss_bytes
    log.info("host memory after %s: %.2f GiB resident (%.2f GiB returned to the system)", after, now / _GIB,
             max(0, before - now) / _GIB)
    return before, now
