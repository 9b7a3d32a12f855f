"""`s2v-tui push RUN_DIR [--repo owner/name] [--checkpoints]`: upload a run folder's LoRA to the Hugging Face Hub.

The same upload a run with `output.push_to_hub` makes at its end (engine.train.hub_push): the exported LoRA files,
a model card with a still of each validation sample, and with --checkpoints (or the run's own
`output.push_checkpoints`) each checkpoint's LoRA files. It is what to run when that upload failed, or to push a run
that had no repo set. The run folder is only read. Exit codes: 0 uploaded, 1 the upload failed, 2 nothing to do
(no run folder, no repo, nothing exported).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="s2v-tui push", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run folder (it holds config.resolved.toml)")
    parser.add_argument("--repo", help="owner/name to upload to (default: the run's output.push_to_hub)")
    parser.add_argument("--checkpoints", action="store_true",
                        help="upload each checkpoint's LoRA files too (default: the run's output.push_checkpoints)")
    args = parser.parse_args(argv)

    from engine.config import ConfigError, read_frozen_config
    from engine.model_source import is_hub_id
    from engine.train.hub_push import NothingToPush, push_run

    run_dir = Path(args.run_dir)
    try:
        config = read_frozen_config(run_dir)
    except (OSError, ConfigError) as exc:
        print(f"error: {run_dir} is not a readable run folder: {exc}", file=sys.stderr)
        return 2
    repo = args.repo or config.output.push_to_hub
    if not repo:
        print(f"error: the run in {run_dir} has no output.push_to_hub: give the repo, e.g. --repo your-name/"
              f"{config.output.name}", file=sys.stderr)
        return 2
    if not is_hub_id(repo):
        print(f"error: '{repo}' is not a Hugging Face repo id of the form owner/name", file=sys.stderr)
        return 2
    checkpoints = args.checkpoints or config.output.push_checkpoints
    print(f"uploading {run_dir} to {repo}" + (" with its checkpoints' LoRA files" if checkpoints else ""))
    try:
        url = push_run(config, run_dir, repo, checkpoints=checkpoints)
    except NothingToPush as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # huggingface_hub's and the network's errors: the message is the useful part
        print(f"error: the upload to {repo} failed: {type(exc).__name__}: {exc}\nthe local files are untouched; "
              "run the same command again to retry", file=sys.stderr)
        return 1
    print(f"uploaded: {url}")
    return 0
