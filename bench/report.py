"""How every bench reports: one JSON line on stdout, also appended to a results file when asked."""
from __future__ import annotations

import json


def emit_result(result: dict, json_path: str | None) -> None:
    """Print a bench result as one JSON line, and append it to `json_path` when given."""
    line = json.dumps(result)
    print(line, flush=True)
    if json_path:
        with open(json_path, "a") as fh:
            fh.write(line + "\n")


def check_host_budget(result: dict, budget_gib: float) -> bool:
    """The host-RAM budget check of a capped run: record the budget and whether the peak RSS stayed within it.
    True when it did (or no budget was given)."""
    if not budget_gib:
        return True
    within = result["peak_host_rss_gib"] <= budget_gib
    result["host_budget_gib"] = budget_gib
    result["host_within_budget"] = within
    return within
