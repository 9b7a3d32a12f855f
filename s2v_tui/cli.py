"""Command line entry point: picks the face (TUI, headless run) or a scripted job.

    s2v-tui [CONFIG.toml]                 the terminal app
    s2v-tui --run PRESET.toml [--set K=V] the whole job headless (check, cache, train, export)
    s2v-tui SUBCOMMAND ...                check, cache, presets, attach, sample, demo, tiny-model, push

Each subcommand owns its arguments (`s2v-tui check --help`). Heavy imports (torch, textual) happen inside the
command that needs them, so `--help` stays instant.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

SUBCOMMANDS = {
    "check": ("s2v_tui.commands.check",
              "inspect a dataset without a GPU: what each clip gives, every problem and its fix"),
    "cache": ("s2v_tui.commands.cache",
              "encode latents, text and audio features of a preset's datasets into the cache"),
    "presets": ("s2v_tui.commands.presets", "the VRAM presets: memory each needs against this machine's GPUs and RAM"),
    "attach": ("s2v_tui.commands.tui:main_attach", "follow a run started elsewhere (headless, another SSH session)"),
    "sample": ("s2v_tui.commands.sample",
               "render a speech-to-video sample with the official recipe, optionally with a LoRA"),
    "demo": ("s2v_tui.commands.demo", "the whole job on a tiny generated model and synthetic clips, on the CPU"),
    "tiny-model": ("s2v_tui.cli:tiny_model_main", "write a tiny S2V model folder in the real layout"),
    "push": ("s2v_tui.commands.push", "upload a run's LoRA, model card and samples to the Hugging Face Hub"),
}


def tiny_model_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="s2v-tui tiny-model",
        description="Write a tiny S2V model folder (same classes and layout as the real one) for tests and demos.",
    )
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deterministic random weights")
    parser.add_argument("--layout", choices=("diffusers", "native"), default="diffusers",
                        help="key layout of the transformer weights (default: diffusers)")
    args = parser.parse_args(argv)
    from engine.models.tiny import write_tiny_model

    out = write_tiny_model(args.out_dir, seed=args.seed, layout=args.layout)
    print(f"tiny S2V model written to {out}")
    return 0


def _call(target: str, argv: list[str]) -> int:
    import importlib

    module_name, _, func = target.partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, func or "main")(argv) or 0)


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="s2v-tui",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train LoRA adapters for Wan 2.2 S2V 14B: terminal app, headless runs and dataset tools.",
        epilog=f"subcommands (each has --help):\n{lines}",
    )
    parser.add_argument("config", nargs="?", help="run config TOML to open in the terminal app")
    parser.add_argument("--run", metavar="PRESET.toml", help="run the whole job headless, no terminal app")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="with --run: override one config key (repeatable), e.g. --set optim.lr=5e-5")
    parser.add_argument("--run-dir", help="with --run: the run folder (default: from the config)")
    parser.add_argument("--gpus", type=int, metavar="N",
                        help="with --run: train on N GPUs of this machine (accelerate launch, one process each)")
    parser.add_argument("--runs", help="folder of run folders for the terminal app (default ./runs)")
    parser.add_argument("--fake", action="store_true", help="terminal app with a fake GPU and engine (a tour)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A rank of `s2v-tui --gpus N`: the launcher ignores the stop signals (s2v_tui.commands.launch) and passed
        # that on; until the run installs its own handlers a stop ends this rank at once (nothing trained yet).
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if any(a == "--gpus" or a.startswith("--gpus=") for a in argv):
        return _call("s2v_tui.commands.launch", argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _call(SUBCOMMANDS[argv[0]][0], argv[1:])
    args = _top_parser().parse_args(argv)
    if args.run:
        if args.config:
            print("error: give either a config to open in the app or --run PRESET.toml, not both", file=sys.stderr)
            return 2
        from s2v_tui.commands.headless import run_headless

        return run_headless(args.run, overrides=args.overrides, run_dir=args.run_dir)
    if args.overrides or args.run_dir:
        print("error: --set and --run-dir go with --run PRESET.toml", file=sys.stderr)
        return 2
    tui_argv = ([args.config] if args.config else []) + (["--runs", args.runs] if args.runs else [])
    tui_argv += ["--fake"] if args.fake else []
    return _call("s2v_tui.commands.tui:main_tui", tui_argv)


if __name__ == "__main__":
    sys.exit(main())
