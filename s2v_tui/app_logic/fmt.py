"""Short, fixed-width renderings of numbers for panels that must fit 80 columns."""
from __future__ import annotations

import math
import time

GIB = 1024**3


def gib(n: int | None, digits: int = 1) -> str:
    """Bytes as GiB ("41.2"); "-" when the reading is missing."""
    return "-" if n is None else f"{n / GIB:.{digits}f}"


def duration(seconds: float | None) -> str:
    """ETA-style durations: "45s", "12m05s", "3h07m", "2d04h"; "-" when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def number(value: float | None, digits: int = 4) -> str:
    """A loss or rate in at most ~8 characters; NaN/inf spelled out (a skipped step reports them)."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def clock(ts: float) -> str:
    """Local wall-clock time of an event, to the second."""
    return time.strftime("%H:%M:%S", time.localtime(ts))
