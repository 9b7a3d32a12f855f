"""Step metrics that are not the loss itself: smoothing, speed, ETA and memory, cheap enough for every step."""
from __future__ import annotations

import collections
import math
import statistics

import torch

from engine.gpu import host_memory


class LossSmoother:
    """Bias-corrected exponential average (as TensorBoard smooths), so the first values are not pulled to 0.
    Non-finite losses are left out of it."""

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self.value = 0.0
        self.count = 0

    def update(self, loss: float) -> float:
        if math.isfinite(loss):
            self.value = self.beta * self.value + (1 - self.beta) * loss
            self.count += 1
        return self.value / (1 - self.beta**self.count) if self.count else float("nan")

    def current(self) -> float | None:
        """The smoothed loss so far; None before the first finite loss."""
        return self.value / (1 - self.beta**self.count) if self.count else None

    def state_dict(self) -> dict:
        return {"value": self.value, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.count = float(state["value"]), int(state["count"])


class StepTimer:
    """Seconds per step as every face shows it: the median of this process's last `window` steps, its first
    `warmup` steps left out.

    The first steps of a process compile kernels, grow the allocator and warm the caches (on a 14B run step 1 took
    several times a later step), so a mean that includes them overstates s/step and the ETA for the whole run;
    a median also ignores the odd slow step (a checkpoint write, a validation) that a mean of ten would carry.
    During the warm-up only the latest step's own time is known: s/step is that, and there is no ETA yet.
    """

    def __init__(self, window: int = 10, warmup: int = 2) -> None:
        self.warmup = warmup
        self.durations: collections.deque[float] = collections.deque(maxlen=window)
        self.seen = 0
        self.last = 0.0

    def add(self, seconds: float) -> None:
        self.seen += 1
        self.last = seconds
        if self.seen > self.warmup:
            self.durations.append(seconds)

    @property
    def s_per_step(self) -> float:
        return statistics.median(self.durations) if self.durations else self.last

    def eta(self, steps_left: int) -> float | None:
        if steps_left <= 0:
            return 0.0
        return self.s_per_step * steps_left if self.durations else None


def memory_stats(device: torch.device) -> tuple[int | None, int | None, int | None]:
    """(peak allocated, peak reserved, host RSS) in bytes; GPU fields are None off CUDA."""
    rss = host_memory().process_rss_bytes or None
    if device.type != "cuda":
        return None, None, rss
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device), rss
