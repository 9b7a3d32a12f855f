"""`s2v-tui check DATASET_DIR... | PRESET.toml [--json]`: the dataset doctor on the command line.

Given a run config (preset) instead of folders, it checks every `[[data.datasets]]` entry with the settings
that training would use (the same `doctor_settings` / `dataset_specs` as the cache and the run), so a preset
that passes here trains on exactly the windows reported.

A rich progress bar and tables on a terminal, plain lines when piped, one JSON document with --json.
Exit status: 0 when nothing blocks training, 1 when a blocking problem exists (or any warning with
--strict), 2 for bad arguments or a config error (named by file and key).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TextIO

from engine.data.discover import DatasetSpec
from engine.data.doctor import DoctorReport, DoctorSettings, inspect_datasets
from engine.data.windows import CROP_MODES, REFERENCE_MODES, BucketSettings, WindowSettings

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
CLIP_TABLE_LIMIT = 30  # above this many clips the per-clip table needs --verbose
PRESET_SUFFIX = ".toml"
# Options that describe the data; with a preset its own keys decide them, so giving both is refused rather
# than one silently winning. Option dest -> the config key to set instead.
DATA_OPTIONS = {"audio_dir": "data.datasets[].audio_dir", "allow_silent_audio": "data.allow_silent_audio",
                "min_side": "data.resolution", "max_area": "data.resolution", "bucket": "data.bucket",
                "crop": "data.crop", "reference": "data.reference", "stride": "data.frames",
                "max_windows": "data.windows_per_clip", "caption_prefix": "data.datasets[].caption_prefix",
                "caption_separator": "data.datasets[].caption_separator",
                "default_caption": "data.datasets[].default_caption"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="s2v-tui check",
        description="Inspect every clip of one or more datasets without a GPU: what each clip will give "
                    "(windows, bucket, fps conversion, reference, audio) and every problem, with its fix.")
    p.add_argument("datasets", nargs="+", type=Path, metavar="DATASET_DIR_OR_PRESET",
                   help="dataset folder(s), or one run config .toml whose [[data.datasets]] are checked with its "
                        "settings")
    p.add_argument("--json", action="store_true", help="print one JSON document (machine-readable)")
    p.add_argument("--audio-dir", type=Path, help="folder of <stem>.wav|flac|mp3|ogg|m4a files "
                   "(default: the audio track inside each video)")
    p.add_argument("--allow-silent-audio", action="store_true",
                   help="clips without audio train with zero audio (warning instead of blocking)")
    p.add_argument("--min-side", type=int, default=DoctorSettings.min_side, metavar="PX",
                   help="smallest accepted shorter side in pixels (default %(default)s)")
    p.add_argument("--max-area", type=int, default=BucketSettings.max_area, metavar="PX",
                   help="largest bucket area (default 832*480 = %(default)s)")
    p.add_argument("--bucket", metavar="WxH[@F]", help="one fixed size for every clip, e.g. 832x480@80")
    p.add_argument("--crop", choices=CROP_MODES, default="center", help="crop to the bucket (default center)")
    p.add_argument("--reference", choices=REFERENCE_MODES, default="first",
                   help="reference frame: first, random, or outside the window (default first)")
    p.add_argument("--stride", type=int, default=WindowSettings.stride, metavar="FRAMES",
                   help="frames between window starts at 16 fps (default %(default)s)")
    p.add_argument("--max-windows", type=int, metavar="N", help="at most N windows per clip")
    p.add_argument("--caption-prefix", default="", metavar="TEXT",
                   help="trigger word put before every caption, as data.datasets.caption_prefix (default none)")
    p.add_argument("--caption-separator", default=", ", metavar="TEXT",
                   help="text between the prefix and the caption (default ', ')")
    p.add_argument("--default-caption", metavar="TEXT",
                   help="caption of clips without a caption file (a warning instead of blocking)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="count caption tokens exactly with this tokenizer folder (default: an estimate)")
    p.add_argument("--workers", type=int, metavar="N", help="parallel readers (default min(8, CPUs))")
    p.add_argument("--strict", action="store_true", help="exit non-zero on warnings too")
    p.add_argument("-v", "--verbose", action="store_true", help="always list every clip's plan")
    return p


def _token_counter(args: argparse.Namespace):
    if args.tokenizer is None:
        return None  # the doctor estimates the token count
    from engine.data.caption_tokens import TokenizerCounter

    return TokenizerCounter(args.tokenizer)


def _settings(args: argparse.Namespace) -> DoctorSettings:
    bucket = BucketSettings(max_area=args.max_area, fixed=args.bucket)
    frames = WindowSettings.frames
    if bucket.fixed:
        from engine.data.windows import parse_fixed_bucket

        frames = parse_fixed_bucket(bucket.fixed).frames or frames
    windows = WindowSettings(frames=frames, stride=args.stride, max_windows=args.max_windows)
    return DoctorSettings(windows=windows, buckets=bucket, crop=args.crop, reference=args.reference,
                          allow_silent_audio=args.allow_silent_audio, min_side=args.min_side, workers=args.workers,
                          count_tokens=_token_counter(args))


def _preset_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path | None:
    """The run config named instead of folders, or None; ValueError for a mix or a data option beside it."""
    presets = [d for d in args.datasets if d.suffix.lower() == PRESET_SUFFIX and not d.is_dir()]
    if not presets:
        return None
    if len(args.datasets) > 1:
        raise ValueError("give either one PRESET.toml or dataset folders, not both (a preset lists its "
                         "folders in [[data.datasets]])")
    given = [f"--{dest.replace('_', '-')}" for dest in DATA_OPTIONS if getattr(args, dest) != parser.get_default(dest)]
    if given:
        keys = sorted({DATA_OPTIONS[o[2:].replace('-', '_')] for o in given})
        raise ValueError(f"{', '.join(given)} cannot be combined with a preset, which sets the data itself; "
                         f"change {', '.join(keys)} in {presets[0]} instead")
    return presets[0]


def _preset_inputs(path: Path, args: argparse.Namespace):
    """The datasets, doctor settings and config of a run config. Raises ConfigError (file, key, fix) or OSError."""
    from engine.config import load_config
    from engine.data.cache_plan import dataset_specs, doctor_settings
    from engine.train.allowed import setting_problems

    config = load_config(path, require_data=True, require_model=False)  # the check reads data, never the model
    # The run's own check phase asks the same function; here the device is not known, so its rules are skipped.
    problems = setting_problems(config)
    if problems:
        raise ValueError(f"{path}: these settings cannot run: " + "; ".join(problems))
    # Relative dataset folders resolve against the working directory, as in `s2v-tui cache` and `--run`.
    settings = dataclasses.replace(doctor_settings(config), workers=args.workers, count_tokens=_token_counter(args))
    return dataset_specs(config, with_eval=True), settings, config


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The clip ids kept out of training for the eval loss (validation.eval_loss.datasets' and holdout's), the line
    that says so, and the refusal when that leaves no training or no eval clip ('' when none)."""
    ids: list[str] = dataclasses.field(default_factory=list)
    line: str = ""
    problem: str = ""


def held_out(report: DoctorReport, specs: list[DatasetSpec], config) -> HeldOut:
    """What the run will hold out; nothing without a preset, a holdout or eval datasets. The choice is the run's
    own (engine.data.holdout.held_out_ids)."""
    v = None if config is None else config.validation.eval_loss
    if v is None or (v.holdout == 0 and not v.datasets):
        return HeldOut()
    from engine.data.cache_plan import clip_id_of, eval_dataset_labels
    from engine.data.holdout import HoldoutError, held_out_ids

    by_label = {s.label: s for s in specs}
    usable = [c for c in report.clips if c.usable and c.plan is not None]
    try:
        held = held_out_ids([(clip_id_of(c.clip, by_label), c.clip.dataset) for c in usable], v.holdout,
                            config.train.seed, eval_dataset_labels(config))
    except HoldoutError as exc:
        return HeldOut(line=f"BLOCKING holdout: {exc}", problem=str(exc))
    held = sorted(held)
    return HeldOut(held, f"held out of training for the eval loss (validation.eval_loss.holdout = {v.holdout:g}, "
                         f"{len(v.datasets)} eval dataset(s)): {len(held)} of {len(usable)} clips: {', '.join(held)}")


def _exit_code(report: DoctorReport, strict: bool, holdout: HeldOut = HeldOut()) -> int:
    if report.blocking or report.cancelled or (strict and report.warnings) or holdout.problem:
        return EXIT_PROBLEMS
    return EXIT_OK


def _summary_line(report: DoctorReport) -> str:
    usable = sum(c.usable for c in report.clips)
    return (f"{len(report.clips)} clips, {usable} usable, {report.windows} windows per epoch; "
            f"{len(report.blocking)} blocking, {len(report.warnings)} warnings; {report.elapsed_s:.2f} s")


def _caption_shown(c) -> str:
    """The caption the model is given (prefix and default caption applied), quoted; '-' when there is none."""
    return "-" if c.clip.caption is None else json.dumps(c.clip.caption, ensure_ascii=False)


def _print_plain(report: DoctorReport, out: TextIO, verbose: bool) -> None:
    if verbose or len(report.clips) <= CLIP_TABLE_LIMIT:
        for c in report.clips:
            if c.plan is None:
                print(f"clip {c.clip.video}: not readable", file=out)
                continue
            pl = c.plan
            print(f"clip {c.clip.video}: {pl.width}x{pl.height} -> {pl.bucket}; {pl.fps_conversion}; {pl.length}, "
                  f"{len(pl.windows)} windows ({sum(w.has_motion for w in pl.windows)} with motion frames); "
                  f"reference {pl.reference}; audio {pl.audio_source}; caption {_caption_shown(c)}", file=out)
    for p in report.all_problems:
        print(f"{p.severity.upper()} {p.code} {p.path}: {p.message} (fix: {p.fix})", file=out)
    print(_summary_line(report), file=out)


def _print_rich(report: DoctorReport, console, verbose: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    if verbose or len(report.clips) <= CLIP_TABLE_LIMIT:
        clips = Table(title="Clips", show_lines=False)
        for col in ("clip", "size -> bucket", "frame rate", "length", "windows", "reference", "audio", "caption"):
            clips.add_column(col, overflow="fold")
        for c in report.clips:
            pl = c.plan
            name = c.clip.video.name if c.usable else f"[red]{c.clip.video.name}[/]"
            if pl is None:
                clips.add_row(name, "-", "-", "-", "-", "-", "-", escape(_caption_shown(c)))
                continue
            clips.add_row(name, f"{pl.width}x{pl.height} -> {pl.bucket}", pl.fps_conversion, pl.length,
                          f"{len(pl.windows)} ({sum(w.has_motion for w in pl.windows)} with motion)",
                          pl.reference, pl.audio_source, escape(_caption_shown(c)))
        console.print(clips)
    if report.all_problems:
        table = Table(title="Problems", show_lines=True)
        for col in ("severity", "code", "file", "what", "fix"):
            table.add_column(col, overflow="fold")
        for p in sorted(report.all_problems, key=lambda p: (p.severity != "blocking", p.code, str(p.path))):
            colour = "red" if p.blocking else "yellow"
            table.add_row(f"[{colour}]{p.severity}[/]", p.code, str(p.path), p.message, p.fix)
        console.print(table)
    style = "red" if report.blocking else ("yellow" if report.warnings else "green")
    console.print(f"[{style}]{_summary_line(report)}[/]")


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad arguments (2)
        return int(exc.code or 0)
    try:
        preset, config = _preset_path(args, parser), None
        if preset is not None:
            specs, settings, config = _preset_inputs(preset, args)
        else:
            settings = _settings(args)
            specs = [DatasetSpec(path=d, audio_dir=args.audio_dir, caption_prefix=args.caption_prefix,
                                 caption_separator=args.caption_separator, default_caption=args.default_caption)
                     for d in args.datasets]
    except OSError as exc:
        print(f"s2v-tui check: cannot read {exc.filename or args.datasets[0]}: {exc.strerror}; pass the path of a "
              "preset file or a dataset folder", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # ConfigError included: it names the file, the key and the fix
        print(f"s2v-tui check: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.json:
        report = inspect_datasets(specs, settings)
        doc = report.to_dict()
        held = held_out(report, specs, config)
        if preset is not None:
            doc["preset"] = str(preset)
            doc["held_out"] = held.ids  # validation.eval_loss.holdout's clip ids; [] without a holdout
            if held.problem:
                doc["holdout_problem"] = held.problem
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return _exit_code(report, args.strict, held)

    if not sys.stdout.isatty():
        report = inspect_datasets(specs, settings)
        _print_plain(report, sys.stdout, args.verbose)
        held = held_out(report, specs, config)
        if held.line:
            print(held.line, file=sys.stdout)
        return _exit_code(report, args.strict, held)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    with Progress(TextColumn("checking"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=True,
                  refresh_per_second=4) as bar:
        task = bar.add_task("", total=None)

        def on_progress(done: int, total: int, path: Path) -> None:
            bar.update(task, completed=done, total=total, description=path.name)

        try:
            report = inspect_datasets(specs, settings, progress=on_progress)
        except KeyboardInterrupt:
            console.print("[yellow]check interrupted[/]")
            return EXIT_PROBLEMS
    _print_rich(report, console, args.verbose)
    held = held_out(report, specs, config)
    if held.line:
        from rich.markup import escape

        console.print(f"[{'red' if held.problem else 'cyan'}]{escape(held.line)}[/]")
    return _exit_code(report, args.strict, held)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
