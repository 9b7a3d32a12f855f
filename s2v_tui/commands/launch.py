"""`s2v-tui --gpus N --run PRESET.toml [...]`: the same command again under `accelerate launch`, one process per GPU.

    s2v-tui --gpus 2 --run presets/80gb.toml --set optim.lr=5e-5
    == accelerate launch --multi_gpu --num_processes 2 -m s2v_tui.cli --run presets/80gb.toml --set optim.lr=5e-5

accelerate (torchrun underneath) starts the processes and sets the environment each one reads; the engine finds
it there (engine.train.distributed). Before launching, the feature cache of the preset is filled in this one
process: filling takes hours on a large dataset, longer than the other ranks could wait at a barrier.
`--gpus 1` runs the command here, as if `--gpus` had not been given.
"""
from __future__ import annotations

import argparse
import os
import sys

from s2v_tui.commands.headless import EXIT_CONFIG


def accelerate_command(num_processes: int, cli_argv: list[str], python: str | None = None) -> list[str]:
    """The argv that runs `s2v-tui <cli_argv>` on `num_processes` processes through accelerate launch."""
    # `python -m accelerate.commands.launch` rather than the `accelerate` script: the same interpreter (and
    # virtual environment) as this process, wherever PATH points. The loop does its own autocast, so accelerate's
    # mixed precision stays "no"; naming it and the machine count keeps accelerate from warning about defaults.
    return [python or sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "s2v_tui.cli", *cli_argv]


def split_gpus(argv: list[str]) -> tuple[int | None, list[str]]:
    """(N of `--gpus N` / `--gpus=N`, the other arguments in order)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--gpus", type=int)
    known, rest = parser.parse_known_args(argv)
    return known.gpus, rest


def _preset_of(argv: list[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run")
    known, _ = parser.parse_known_args(argv)
    return known.run


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str]) -> int:
    gpus, rest = split_gpus(argv)
    if gpus is None:
        print("error: s2v_tui.commands.launch needs --gpus N", file=sys.stderr)
        return EXIT_CONFIG
    preset = _preset_of(rest)
    if gpus < 1 or preset is None:
        print("error: --gpus N (N >= 1) goes with --run PRESET.toml, e.g. s2v-tui --gpus 2 --run presets/80gb.toml",
              file=sys.stderr)
        return EXIT_CONFIG
    from s2v_tui.cli import main as cli_main

    if gpus == 1:
        return cli_main(rest)
    have = _gpu_count()
    if have < gpus:
        print(f"error: --gpus {gpus}, but this machine shows {have} CUDA GPU(s) (CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); ask for at most {have}", file=sys.stderr)
        return EXIT_CONFIG
    from s2v_tui.commands.cache import main as cache_main

    print(f"filling the feature cache of {preset} in one process before starting {gpus}", flush=True)
    code = cache_main([preset])
    if code != 0:
        return code
    command = accelerate_command(gpus, rest)
    print("starting: " + " ".join(command), flush=True)
    sys.stdout.flush()
    # Replace this process: Ctrl-C and SIGTERM then reach accelerate's launcher, which passes them to every rank,
    # and each rank checkpoints at the same step (the stop is agreed through a collective).
    os.execv(command[0], command)
    return 0  # not reached
