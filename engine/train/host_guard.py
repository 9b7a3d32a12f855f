"""Host-RAM guard: stop a run with a checkpoint while host memory runs short, before the kernel's OOM killer does.

The killer gives no warning: a 24 GB-card run on a small host died at step 2 with exit 137 and nothing written,
losing the work since the last interval checkpoint (issue 15). The guard watches the host's available memory
(the machine's, or a container's cgroup limit where that is tighter: engine.gpu.host_memory) against a margin,
`memory.host_ram_margin_gb`, and says why the run should stop; the training loop checks it at every step
boundary, writes a checkpoint and ends the run with that reason.

What kills is a spike inside a step (pinned buffers, the optimizer's first step, a validation sample), and the
loop only looks between steps. So `start()` runs a daemon thread that reads every `interval_s` (0.5 s by
default: one /proc/meminfo read and a few cgroup files, well under a millisecond) and latches the first reading
under the margin; `check()` at the boundary then sees it even when memory has recovered since. A spike that
came within the margin and passed is the warning that the next one may not pass.

The margin must cover what stopping needs: the checkpoint's host copy of the LoRA and optimizer state (about
0.7 GiB at rank 16 on the 14B model) and the kernel's own headroom; 2 GB is the default, 0 turns the guard off.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

GIB = 2**30
POLL_INTERVAL_S = 0.5

# Returns the host's available memory in bytes, or None when it cannot tell (then the guard does nothing).
Reader = Callable[[], "int | None"]


def available_host_bytes() -> int | None:
    """The host's available memory now (engine.gpu.host_memory: cgroup-aware), or None if it cannot be read."""
    from engine.gpu import host_memory

    try:
        return host_memory().available_bytes
    except Exception:  # psutil or /proc unreadable: no reading, no guard, never a crash of the run
        log.debug("host memory reading failed", exc_info=True)
        return None


def settings_advice(config) -> str:
    """What in `config` holds host RAM while it trains and what to set instead, as one sentence. (The low-bit
    load's bf16 copy is gone by then: the pre-flight check covers the load.)"""
    m = config.memory
    ways = []
    if m.offload_checkpoint_inputs:
        ways.append("memory.offload_checkpoint_inputs = false (the saved block inputs stay on the GPU)")
        ways.append(f"a higher memory.gpu_saved_inputs (now {m.gpu_saved_inputs}: more saved block inputs stay on "
                    "the GPU, fewer in pinned host RAM)")
    if m.block_offload:
        ways.append(f"a higher memory.blocks_resident (now {m.blocks_resident}: more blocks stay on the GPU, fewer "
                    "are held in pinned host RAM)")
    if not ways:
        return "This config keeps nothing optional in host RAM: use a host with more RAM."
    return "To need less host RAM (as far as the card allows): " + "; or ".join(ways) + "."


def _how_to_take(config, preset, name: str) -> str:
    """How a run moves to `preset`'s [memory] settings: resumed when they differ only in placement keys (where
    tensors live), else only as a new run (its base numerics differ)."""
    from engine.config import PLACEMENT_KEYS, diff

    changed = [c.key for c in diff(config, preset) if c.key.startswith("memory.")]
    if all(key in PLACEMENT_KEYS for key in changed):
        return (f"set its [memory] values ({', '.join(changed)}) in this run's config and rerun: the run resumes "
                "with them.")
    return f"`extends` it in a new run's config (another output.name: {name} changes the base's numerics)."


class HostMemoryGuard:
    """`check()` -> None while the host has at least `margin_bytes` available, else the reason to stop.

    Use as a context manager around the training loop (`with guard:` starts the polling thread and joins it on
    the way out), or call `check()` alone (it then reads once per call). Thread-safe; latched: once tripped it
    keeps answering the first reason.
    """

    def __init__(self, margin_bytes: int, read_available: Reader = available_host_bytes, *,
                 advice: str = "", interval_s: float = POLL_INTERVAL_S) -> None:
        self.margin_bytes = max(0, int(margin_bytes))
        self._read = read_available
        self.advice = advice
        self.interval_s = interval_s
        self.lowest_bytes: int | None = None  # the lowest reading so far, for the reason and the logs
        self.tripped = threading.Event()
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config, read_available: Reader = available_host_bytes, *, presets: dict | None = None,
                    vram_bytes: int | None = None, interval_s: float = POLL_INTERVAL_S) -> HostMemoryGuard:
        """The guard of `config` (memory.host_ram_margin_gb, in GB as vram_budget_gb). With `presets` (name ->
        config, e.g. engine.presets.shipped_presets(), for the 14B model only: the memory model knows no other) the
        reason names the preset that needs the least host RAM and fits the card (`vram_bytes` free, or no more GPU
        memory than `config` needs when None); otherwise the settings to change."""
        margin = int(config.memory.host_ram_margin_gb * 1e9)
        advice = ""
        if presets and margin:
            from engine.memory import predict
            from engine.presets import less_host_ram_preset

            lighter = less_host_ram_preset(config, presets, vram_bytes)
            if lighter is not None:
                name, host = lighter
                advice = (f"The preset {name!r} needs about {host / GIB:.1f} GiB of host RAM against "
                          f"{predict(config)[1] / GIB:.1f} GiB for this config: "
                          + _how_to_take(config, presets[name], name))
        if not advice:
            # These are placement settings (engine.config.PLACEMENT_KEYS): the same run resumes with them changed.
            advice = settings_advice(config)
        return cls(margin, read_available, advice=advice, interval_s=interval_s)

    @property
    def enabled(self) -> bool:
        return self.margin_bytes > 0

    @property
    def reason(self) -> str | None:
        return self._reason

    def check(self) -> str | None:
        """None when the host has the margin free (or the guard is off, or memory cannot be read); else one
        paragraph: what is available against the margin, what to change, and that rerunning resumes."""
        if not self.enabled:
            return None
        if self._reason is not None:
            return self._reason
        return self._poll()

    def _poll(self) -> str | None:
        try:
            available = self._read()
        except Exception:  # an injected or broken reader: no reading, as with None
            log.debug("host memory reader failed", exc_info=True)
            available = None
        if available is None:
            return None
        with self._lock:
            if self.lowest_bytes is None or available < self.lowest_bytes:
                self.lowest_bytes = available
            if available >= self.margin_bytes or self._reason is not None:
                return self._reason
            self._reason = self._message(available)
            self.tripped.set()
        log.warning("host RAM guard: %.2f GiB available, under the %.2f GiB margin", available / GIB,
                    self.margin_bytes / GIB)
        return self._reason

    def _message(self, available: int) -> str:
        return (f"Host RAM ran short: {available / GIB:.1f} GiB available, under the margin of "
                f"memory.host_ram_margin_gb = {self.margin_bytes / 1e9:g} GB ({self.margin_bytes / GIB:.1f} GiB), so "
                "the run stopped before the kernel's out-of-memory killer could end it unsaved. Rerunning the same "
                "command resumes from the checkpoint written now; with the same settings, free host RAM first "
                "(close other programs) or it stops here again. "
                f"{self.advice}").rstrip()

    # ---- the polling thread -----------------------------------------------------------------------------------
    def start(self) -> HostMemoryGuard:
        """Poll every interval_s in a daemon thread until stop() or the first trip. No thread when off."""
        if self.enabled and self._thread is None:
            self._halt.clear()
            self._thread = threading.Thread(target=self._watch, name="host-ram-guard", daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._halt.is_set():
            if self._poll() is not None:
                return  # latched: the loop reads the reason at its next step boundary
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        """Stop the polling thread and wait for it (it wakes at once: the wait is on an event)."""
        self._halt.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> HostMemoryGuard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
