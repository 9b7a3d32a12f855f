"""Kept importable for s2v_tui/screens/new_run.py, which imports `source_problem` from here and belongs to the
terminal-app work: the code is engine/model_source.py (below the config rules); new code imports that."""
from engine.model_source import (EXAMPLE_HUB_ID, SOURCE_FIX, fetch_from_hub, is_hub_id,  # noqa: F401
                                 looks_like_path, require_source, source_problem)
