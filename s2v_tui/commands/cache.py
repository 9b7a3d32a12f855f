"""`s2v-tui cache PRESET.toml`: fill the feature cache of a run config before training.

Checks the datasets (the same doctor as `s2v-tui check`), then computes only the missing entries: VAE latents,
wav2vec2 features and UMT5 states, one encoder on the device at a time. A rich progress bar on a terminal
(log lines above it), plain lines when piped. Ctrl-C stops cleanly: every entry written so far is whole and
kept, and the next run continues from there.

Exit status: 0 cache complete; 1 nothing to train on, stopped, a clip was skipped with --strict, or a
failure; 2 the preset or the arguments are wrong.
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
PHASE_NAMES = {"check": "checking clips", "vae": "VAE latents", "audio": "audio features", "text": "captions"}
PLAIN_EVERY_S = 10.0  # piped output: one line per phase change, then at most one every this many seconds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="s2v-tui cache",
        description="Fill the cache of VAE latents, audio features and text embeddings for a run config; "
                    "only entries whose clip, caption, encoder or setting changed are computed.")
    p.add_argument("preset", type=Path, metavar="PRESET.toml", help="the run config")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--verify", action="store_true",
                   help="read every existing entry in full and check its digest (slower; default: headers only)")
    p.add_argument("--prune", action="store_true",
                   help="afterwards, delete entries this config does not use (also those of other configs "
                        "sharing the cache folder)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any clip was skipped")
    return p


class _PlainProgress:
    def __init__(self, out: TextIO) -> None:
        self.out, self.phase, self.last = out, None, 0.0

    def __call__(self, p) -> None:
        now = time.monotonic()
        if p.phase != self.phase or p.done >= p.total or now - self.last >= PLAIN_EVERY_S:
            self.phase, self.last = p.phase, now
            print(f"{PHASE_NAMES.get(p.phase, p.phase)}: {p.done}/{p.total} {p.detail}", file=self.out, flush=True)


def _summary(plan, out: TextIO) -> None:
    for video, problem in plan.warnings:
        print(f"warning {problem.code} {video}: {problem.message} (fix: {problem.fix})", file=out)
    for skip in plan.skipped:
        reasons = "; ".join(f"{p.code}: {p.message} (fix: {p.fix})" for p in skip.problems) or "no window fits"
        print(f"skipped {skip.video}: {reasons}", file=out)
    motion = sum(r.window.has_motion for r in plan.records)
    clips = len({r.clip_id for r in plan.records})
    print(f"cache {plan.root}: {len(plan.records)} windows from {clips} clips ({motion} with motion frames), "
          f"{len(plan.skipped)} clips skipped" + ("" if plan.complete else "; STOPPED before the end"), file=out)


def _run(config, settings, device, progress: Callable, stop: threading.Event):
    from engine.data.cache_fill import fill_cache

    return fill_cache(config, progress, device, settings=settings, stop=stop)


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad arguments (2)
        return int(exc.code or 0)
    from engine.config import ConfigError, load_config

    try:
        config = load_config(args.preset, require_data=True)
    except ConfigError as exc:
        print(f"s2v-tui cache: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"s2v-tui cache: cannot read {args.preset}: {exc.strerror}; pass the path of a preset file",
              file=sys.stderr)
        return EXIT_USAGE
    from engine.data.cache_plan import CacheSettings
    from engine.data.problems import DataError

    settings = CacheSettings(verify_existing=args.verify)
    stop = threading.Event()
    tty = sys.stdout.isatty()
    console = bar = None
    if tty:
        from rich.console import Console
        from rich.logging import RichHandler
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console()
        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
        bar = Progress(TextColumn("{task.fields[phase]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.description}"), console=console, transient=True, refresh_per_second=4)
        tasks: dict[str, int] = {}

        def progress(p) -> None:
            if p.phase not in tasks:
                tasks[p.phase] = bar.add_task("", total=p.total, phase=PHASE_NAMES.get(p.phase, p.phase))
            bar.update(tasks[p.phase], completed=p.done, total=p.total, description=p.detail)
    else:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        progress = _PlainProgress(sys.stdout)

    try:
        if bar is not None:
            with bar:
                plan = _run(config, settings, args.device, progress, stop)
        else:
            plan = _run(config, settings, args.device, progress, stop)
    except KeyboardInterrupt:
        print("cache filling interrupted: the entries written so far are whole and kept; run the same command "
              "to continue", file=sys.stderr)
        return EXIT_PROBLEMS
    except (ValueError, FileNotFoundError, RuntimeError, DataError) as exc:
        print(f"s2v-tui cache: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    out = sys.stdout
    _summary(plan, out)
    if args.prune and plan.complete and plan.records:
        from engine.data.cache import CacheStore

        live = {"window": {r.window_key for r in plan.records}, "reference": {r.reference_key for r in plan.records},
                "audio": {r.audio_key for r in plan.records},
                "text": {r.text_key for r in plan.records} | {plan.empty_text_key},
                "crepa": {r.crepa_key for r in plan.records if r.crepa_key}}  # none at all with crepa off
        print(f"pruned {CacheStore(plan.root).prune(live)} entries this config does not use", file=out)
    if not plan.records or not plan.complete or (args.strict and plan.skipped):
        return EXIT_PROBLEMS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
