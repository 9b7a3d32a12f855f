"""What `model.source` names: a local model folder or a Hugging Face hub id, told apart before any loader runs.

The loaders of huggingface_hub, diffusers and transformers treat any string that is not an existing folder as a
hub id, so a mistyped local path comes back as a hub-id validation error that never says the folder is missing.
Every loader of the engine asks `source_problem` first. Nothing heavy is imported here: the config rules use it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

EXAMPLE_HUB_ID = "Wan-AI/Wan2.2-S2V-14B"
# The hub's own rule for owner/name (huggingface_hub.utils.validate_repo_id), owner required: every S2V
# checkpoint lives under an organisation, and a bare name is far more often a local folder mistyped.
_HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?")
_PATH_STARTS = ("/", "./", "../", "~", ".\\", "..\\")


def looks_like_path(source: str) -> bool:
    """True when `source` can only mean a folder: absolute, relative with ./ or ../, ~, or more than one /."""
    return (source.startswith(_PATH_STARTS) or source in (".", "..") or "\\" in source
            or source.count("/") > 1)


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.fullmatch(source)) and "--" not in source and ".." not in source \
        and not source.endswith(".git")


def source_problem(source: str | os.PathLike) -> str | None:
    """None when `source` is an existing folder, or could be a hub id; otherwise what is wrong, in a sentence
    that starts with the source itself."""
    text = str(source)
    if not text.strip():
        return "the model source is empty"
    path = Path(text).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return f"{text} is a file, not a model folder"
    if looks_like_path(text):
        return (f"the folder {text} does not exist (a hub id has the form owner/name, e.g. {EXAMPLE_HUB_ID}, "
                "and is not a path)")
    if not is_hub_id(text):
        return (f"'{text}' is neither an existing folder nor a hub id of the form owner/name "
                f"(e.g. {EXAMPLE_HUB_ID})")
    return None


SOURCE_FIX = (f"point model.source at the downloaded model folder (the one holding transformer/ and vae/), "
              f"or give a hub id such as {EXAMPLE_HUB_ID}")


def require_source(source: str | os.PathLike) -> None:
    """Raise FileNotFoundError when `source` is neither an existing folder nor a possible hub id."""
    problem = source_problem(source)
    if problem is not None:
        raise FileNotFoundError(f"model source: {problem}; {SOURCE_FIX}")


def fetch_from_hub(repo_id: str, patterns: list[str]) -> Path:
    """The local snapshot of `repo_id` (only the files matching `patterns`), downloaded when needed.

    Failures come back as FileNotFoundError saying what to do, not as huggingface_hub's own exceptions."""
    require_source(repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except HFValidationError as exc:
        raise FileNotFoundError(f"model source: '{repo_id}' is neither an existing folder nor a valid hub id "
                                f"({exc}); {SOURCE_FIX}") from exc
    except (LocalEntryNotFoundError, OSError) as exc:
        raise FileNotFoundError(
            f"model source: could not fetch {repo_id!r} from the hub ({type(exc).__name__}); on a machine without "
            "network, download the model elsewhere and point model.source at its local folder") from exc
