"""What the terminal app costs the training it shows: tiny-model CPU throughput with and without the TUI, and
key-to-paint latency while training.

    python -m bench.tui_overhead --steps 300 --repeats 3 [--threads 1] [--presses 20]

Faces, each in a fresh process on the same preset (the demo's tiny model and clips; the feature cache is
filled once by a warm-up run, so every measured run only loads and trains):
  headless  `s2v-tui --run PRESET`, plain lines to a file
  tmux      the installed `s2v-tui PRESET` in a real terminal (tmux, 80x24): key 4, key s, nobody watching the
            pane while it trains (the run's end is read from events.jsonl, not from the screen)
  pilot     the same app in `App.run_test` (headless Textual: the whole UI, no terminal output)
The faces are interleaved per repeat (the box is shared; load drifts) and the median is reported. Throughput
is steps/s between step 20 and the last step, from the `ts` of the run's own step_end events.

Latency: a long tmux run; once it trains, press x (the stop question opens) then Escape (it closes), `--presses`
times each, timing from just before `tmux send-keys` to the first `capture-pane` that shows the change. The
polling is a tmux client per read (a few ms each), so the figures include that resolution.

`--threads N` sets OMP_NUM_THREADS for every face (same torch thread count everywhere); without it each face
keeps its own default (headless: all cores; the app: one core fewer, see services.leave_a_core_for_the_ui).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARM_STEP = 20


def steps_per_s(run_dir: Path) -> float:
    steps = []
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["kind"] == "step_end" and event["step"] >= WARM_STEP:
            steps.append((event["step"], event["ts"]))
    (s0, t0), (s1, t1) = steps[0], steps[-1]
    return (s1 - s0) / (t1 - t0)


def run_ended(run_dir: Path) -> bool:
    path = run_dir / "events.jsonl"
    return path.exists() and '"kind":"run_ended"' in path.read_text()


def app_command() -> str:
    beside = Path(sys.executable).parent / "s2v-tui"
    return str(beside) if beside.exists() else (shutil.which("s2v-tui") or "s2v-tui")


def face_headless(preset: Path, run_dir: Path, env: dict) -> None:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.out", "w") as out:
        subprocess.run([app_command(), "--run", str(preset)], stdout=out, stderr=subprocess.STDOUT, env=env,
                       check=True, timeout=1200)


def face_tmux(preset: Path, run_dir: Path, env: dict) -> None:
    from s2v_tui.testing.tmux_driver import TmuxApp

    with TmuxApp([app_command(), str(preset), "--runs", str(run_dir.parent)], preset.parent,
                 env=_env_delta(env)) as term:
        term.wait_for("1 Dataset", 60, "the app")
        term.send("4")
        term.wait_for("press s to start", 20, "the Run screen")
        term.send("s")
        while not run_ended(run_dir):  # nobody polls the pane: a watcher would cost CPU the run needs
            time.sleep(0.5)
        term.send("C-q")
        term.wait_exit(30)


def face_pilot(preset: Path, run_dir: Path, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "bench.tui_overhead", "--pilot-child", str(preset)], env=env,
                   check=True, timeout=1200, cwd=Path(__file__).resolve().parents[1])


def pilot_child(preset: Path) -> None:
    """The app under `run_test` in this process: Run screen, start, wait for the worker to finish."""
    import asyncio

    from s2v_tui.app import build_app
    from s2v_tui.services import default_services
    from s2v_tui.session import start_session

    services = default_services(runs_dir=preset.parent / "runs")
    app = build_app(services, start_session(preset, services.presets_dir), start_mode="run")

    async def drive() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("s")
            await app.workers.wait_for_complete()

    asyncio.run(drive())


def latency(preset: Path, env: dict, presses: int) -> dict:
    from s2v_tui.testing.tmux_driver import TmuxApp

    def timed(term, key: str, shown: bool) -> float:
        start = time.perf_counter()
        term.send(key)
        while ("Stop training?" in term.screen()) != shown:
            pass
        return (time.perf_counter() - start) * 1000

    opened, closed = [], []
    with TmuxApp([app_command(), str(preset), "--runs", str(preset.parent / "runs")], preset.parent,
                 env=_env_delta(env)) as term:
        term.wait_for("1 Dataset", 60, "the app")
        term.send("4")
        term.wait_for("press s to start", 20, "the Run screen")
        term.send("s")
        term.wait_for(r"step \d\d+/", 120, "training")
        for _ in range(presses):
            opened.append(timed(term, "x", True))
            time.sleep(0.2)
            closed.append(timed(term, "Escape", False))
            time.sleep(0.2)
        capture = [_time_capture(term) for _ in range(20)]
        term.send("C-q")
        term.wait_for("A run is in progress", 10, "the quit question")
        term.send("BTab", "Enter")
        term.wait_exit(60)

    def summary(ms: list[float]) -> dict:
        ms = sorted(ms)
        return {"median_ms": round(statistics.median(ms), 1), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1),
                "max_ms": round(ms[-1], 1), "n": len(ms)}

    return {"open_stop_question": summary(opened), "close_it": summary(closed),
            "one_capture_pane_ms": round(statistics.median(capture), 1)}


def _time_capture(term) -> float:
    start = time.perf_counter()
    term.screen()
    return (time.perf_counter() - start) * 1000


def _env_delta(env: dict) -> dict:
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every face")
    ap.add_argument("--presses", type=int, default=20)
    ap.add_argument("--faces", default="headless,tmux,pilot")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--pilot-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pilot_child:
        pilot_child(args.pilot_child)
        return

    from s2v_tui.testing.fakes import write_tiny_run_preset

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(args.out or tempfile.mkdtemp(prefix="tui_overhead_")).resolve()
    faces = {"headless": face_headless, "tmux": face_tmux, "pilot": face_pilot}
    chosen = args.faces.split(",")
    warm = write_tiny_run_preset(work, steps=WARM_STEP + 1, name="warmup")
    face_headless(warm, work / "runs" / "warmup", env)  # fills the shared feature cache
    rates: dict[str, list[float]] = {face: [] for face in chosen}
    for rep in range(args.repeats):
        for face in chosen:
            name = f"{face}-{rep}"
            preset = write_tiny_run_preset(work, steps=args.steps, name=name)
            faces[face](preset, work / "runs" / name, env)
            rates[face].append(steps_per_s(work / "runs" / name))
            print(f"{name}: {rates[face][-1]:.2f} steps/s", file=sys.stderr, flush=True)
    result = {"steps": args.steps, "repeats": args.repeats, "threads": args.threads or "default",
              "cores": os.cpu_count(), "steps_per_s": {f: [round(r, 2) for r in rs] for f, rs in rates.items()}}
    base = statistics.median(rates["headless"]) if "headless" in rates else None
    for face, rs in rates.items():
        result[f"{face}_median_steps_per_s"] = round(statistics.median(rs), 2)
        if base and face != "headless":
            result[f"{face}_overhead_pct"] = round(100 * (1 - statistics.median(rs) / base), 1)
    if args.presses:
        result["key_to_paint"] = latency(write_tiny_run_preset(work, name="latency"), env, args.presses)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
