"""Command line entry point: picks the face (TUI, headless run) or a scripted job.

Heavy imports (torch, textual) happen inside the command that needs them, so `--help` stays instant.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from engine.models.tiny import write_tiny_model

    out = write_tiny_model(args.out_dir, seed=args.seed, layout=args.layout)
    print(f"tiny S2V model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2v-tui",
        description="Train LoRA adapters for Wan 2.2 S2V 14B: terminal app, headless runs and dataset tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tiny = sub.add_parser(
        "tiny-model",
        help="write a tiny S2V model folder (same classes and layout as the real one) for tests and demos",
    )
    tiny.add_argument("out_dir", help="folder to write (created if missing)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the deterministic random weights")
    tiny.add_argument(
        "--layout",
        choices=("diffusers", "native"),
        default="diffusers",
        help="key layout of the transformer weights (default: diffusers)",
    )
    tiny.set_defaults(func=_cmd_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
