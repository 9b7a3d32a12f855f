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
