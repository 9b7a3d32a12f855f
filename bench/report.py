"""How every bench reports: one JSON line on stdout, also appended to a results file when asked."""
from __future__ import annotations

import json
import resource


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
