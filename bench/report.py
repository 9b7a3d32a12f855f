"""How every bench reports: one JSON line on stdout, also appended to a results file when asked; and the
measurements more than one bench takes (peak RSS, step times from StepEnd events, a process tree's memory)."""
from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def emit_result(result: dict, json_path: str | None) -> None:
    """Print a bench result as one JSON line, and append it to `json_path` when given."""
    line = json.dumps(result)
    print(line, flush=True)
    if json_path:
        with open(json_path, "a") as fh:
            fh.write(line + "\n")


def peak_host_rss_gib(ndigits: int | None = 2) -> float:
    """This process's peak resident host memory so far, GiB (Linux reports ru_maxrss in KiB)."""
    gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return gib if ndigits is None else round(gib, ndigits)


def check_host_budget(result: dict, budget_gib: float) -> bool:
    """The host-RAM budget check of a capped run: record the budget and whether the peak RSS stayed within it.
    True when it did (or no budget was given)."""
    if not budget_gib:
        return True
    within = result["peak_host_rss_gib"] <= budget_gib
    result["host_budget_gib"] = budget_gib
    result["host_within_budget"] = within
    return within


def step_durations(events: Sequence) -> list[float]:
    """Each step's own duration, from the StepEnd events of one run (StepEnd.s_per_step is a recent median)."""
    return [e.step_s for e in events]


# ---- a process tree's memory while it runs ---------------------------------------------------------------------
@dataclass(frozen=True)
class MemorySample:
    t: float  # time.time(), the clock of the engine's events
    tree_rss: int  # the process and all its descendants (compile workers, loaders); shared pages count per process
    rss: int  # the process alone
    system_used: int  # the host's total - available (engine.gpu.host_memory: a container's cgroup when tighter)
    gpu_used: int | None  # device memory in use (NVML), None without a reading
    # From /proc/PID/smaps_rollup (None where the kernel has none): the tree's proportional set size (each shared
    # page split between the processes that map it, so the sum is what the tree holds) and the descendants'
    # private pages (USS: what ending the compile workers would give back).
    tree_pss: int | None = None
    children_uss: int | None = None


def smaps_rollup(pid: int) -> tuple[int, int] | None:
    """(PSS, USS) of one process in bytes from /proc/PID/smaps_rollup, or None where it cannot be read."""
    try:
        text = open(f"/proc/{pid}/smaps_rollup").read()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    if "Pss" not in fields:
        return None
    return fields["Pss"], fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def _tree(pid: int):
    """(the process, its descendants) of `pid`, listed once per reading; None once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return root, root.children(recursive=True)
    except psutil.Error:
        return None


def _rss_of(root, children) -> tuple[int, int]:
    import psutil

    try:
        own = root.memory_info().rss
    except psutil.Error:
        return 0, 0
    total = own
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:  # it ended between the listing and the reading
            continue
    return own, total


def _shares_of(root, children) -> tuple[int | None, int | None]:
    """(PSS of the process and its descendants, USS of the descendants alone); None where smaps_rollup is missing."""
    own = smaps_rollup(root.pid)
    if own is None:
        return None, None
    pss, uss = own[0], 0
    for child in children:
        share = smaps_rollup(child.pid)
        if share is not None:  # None: it ended between the listing and the reading
            pss += share[0]
            uss += share[1]
    return pss, uss


def tree_rss_bytes(pid: int) -> tuple[int, int]:
    """(RSS of `pid`, RSS of `pid` and every descendant); (0, 0) once it is gone."""
    tree = _tree(pid)
    return _rss_of(*tree) if tree is not None else (0, 0)


def sample_memory(pid: int, done: Callable[[], bool], interval_s: float = 0.2,
                  gpu_used: Callable[[], int | None] | None = None,
                  on_sample: Callable[[MemorySample], None] | None = None) -> list[MemorySample]:
    """Sample the memory of process `pid`'s tree, the host's and (with `gpu_used`) the GPU's every `interval_s`
    until `done()` is true (e.g. the process has exited); returns the samples in time order."""
    from engine.gpu import host_memory

    samples: list[MemorySample] = []
    while not done():
        started = time.time()
        listed = _tree(pid)  # one listing of the tree for both readings
        own, tree = _rss_of(*listed) if listed is not None else (0, 0)
        pss, children_uss = _shares_of(*listed) if listed is not None else (None, None)
        host = host_memory()
        sample = MemorySample(started, tree, own, host.used_bytes, gpu_used() if gpu_used else None,
                              pss, children_uss)
        samples.append(sample)
        if on_sample:
            on_sample(sample)
        time.sleep(max(0.0, interval_s - (time.time() - started)))
    return samples


def peak(samples: Sequence[MemorySample], field: str, start: float | None = None,
         end: float | None = None) -> int | None:
    """The largest `field` of the samples taken in [start, end) (all when not given); None if none has it."""
    values = [getattr(s, field) for s in samples
              if (start is None or s.t >= start) and (end is None or s.t < end) and getattr(s, field) is not None]
    return max(values) if values else None
