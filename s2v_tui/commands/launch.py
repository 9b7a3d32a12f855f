"""`s2v-tui --gpus N --run PRESET.toml [...]`: the same command again under `accelerate launch`, one process per GPU.

    s2v-tui --gpus 2 --run presets/80gb.toml --set optim.lr=5e-5
    == accelerate launch --multi_gpu --num_processes 2 -m s2v_tui.cli --run presets/80gb.toml --set optim.lr=5e-5

accelerate (torchrun underneath) starts the processes and sets the environment each one reads; the engine finds
it there (engine.train.distributed). Before launching, the feature cache of the preset is filled in this one
process: filling takes hours on a large dataset, longer than the other ranks could wait at a barrier.
`--gpus 1` runs the command here, as if `--gpus` had not been given.

Signals: the launcher runs in a session of its own and ignores SIGINT, SIGTERM and SIGHUP; this process takes them
and passes a stop to the ranks themselves (`run_launcher`). Left to itself, torchrun would pass a Ctrl-C on to the
ranks that the terminal had already sent them (two SIGINTs: the hard stop, without a checkpoint) and kill them 30 s
after any signal, before a 14B rank has finished its step and written the checkpoint.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from s2v_tui.commands.headless import EXIT_CONFIG, EXIT_STOPPED

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
    return run_launcher(command)


def rank_pids(launcher_pid: int) -> list[int]:
    """The launcher's child processes (the ranks), from Linux's /proc; [] once it has none."""
    pids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{launcher_pid}/task").iterdir())
    except OSError:
        return pids
    for task in tasks:
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


# Runs the launcher with the stop signals ignored: dispositions set to "ignore" survive exec (the ranks inherit them
# until the CLI resets them), and torchrun installs no handler of its own for them (TORCHELASTIC_SIGNALS_TO_HANDLE).
# A one-line exec, not Popen's preexec_fn, which is unsafe once this process has threads (the cache phase's).
_IGNORING = ("import os, signal, sys\n"
             f"for s in ({', '.join(f'signal.{sig.name}' for sig in FORWARDED)}): signal.signal(s, signal.SIG_IGN)\n"
             "os.execv(sys.argv[1], sys.argv[1:])")


def run_launcher(command: list[str]) -> int:
    """Run the accelerate launch `command`; the first SIGINT/SIGTERM/SIGHUP here becomes a SIGTERM to every rank
    (each stops at the same step and rank 0 writes the checkpoint), a later SIGINT a SIGINT to each (the hard stop
    of a second Ctrl-C). Returns the launcher's exit code, or 75 (stopped; the same command resumes) when a stop
    was passed on and the launcher then ended with an error (torchrun reports the ranks' 75 as a failure)."""
    env = {**os.environ, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGQUIT"}
    proc = subprocess.Popen([sys.executable, "-c", _IGNORING, *command], env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        hard = signum == signal.SIGINT and len(received) > 1
        ranks = rank_pids(proc.pid)
        print(f"{signal.Signals(signum).name}: {'hard stop' if hard else 'stopping'} {len(ranks)} rank(s) "
              f"{'now' if hard else 'at the next step, after a checkpoint'}", file=sys.stderr, flush=True)
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGINT if hard else signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_STOPPED if received and code != 0 else code
