"""Measure the user's real path: `s2v-tui --run` on a config that extends a preset, sampled from outside.

What a user does, and what bench/engine_step.py skips: a model folder read from local disk (transformer, VAE,
UMT5, wav2vec2), real clips through the cache phase's encoders, the cached windows, a validation case, the CLI's
own process. This script
1. writes a full-size random-weight model folder with the encoders (bench/engine_step.py's and
   bench/cache_speed.py's writers, in a child process so that this one holds no CUDA context) into
   `--model-dir`, unless the folder already holds a complete one (a second call on a warm machine reuses it);
   `--tiny`: engine.models.tiny;
2. makes `--clips` synthetic talking clips (engine/data/synth.py; 832x480, 11 s; 64x64 with --tiny);
3. writes a run config that `extends` presets/<preset>.toml, with the clips, a validation case (on unless
   `--no-validation`), optim.max_steps, memory.vram_budget_gb from `--cap-gib` (GiB, as model_step.py's cap);
4. runs `python -m s2v_tui.cli --run CONFIG [--set K=V ...]` and samples, every 0.2 s while it runs, the RSS of
   its process tree, the host's used memory (total - available) and the GPU's used memory (NVML);
5. reads the run folder afterwards: per-step times, peak GPU memory and phase times from events.jsonl, the
   pre-flight's prediction from train.log;
6. prints one JSON line (appended to `--out` too): medians, peaks by phase, the prediction beside the
   measurement, the exit code.

On the GPU machine, from the repository root (`carry: [".whl"]`, the wheels and preamble of bench/engine_step.py,
av included for the clips):

    python3 bench/user_run.py --preset 24gb --cap-gib 24 --steps 14 --out $OUT/user_run.jsonl

The model folder goes to .user-run/model in the repository root by default: on the machine's disk (a model on
/dev/shm or a memory-backed /tmp is host RAM, and counts against the run), ignored by git, so it stays on a warm
machine between calls. Everything else (clips, cache, run folder) goes to a fresh folder beside it, removed at
the end unless `--keep`. `--timeout-s` sends the run SIGTERM at that age (it checkpoints and exits 75), so a
call ends with its JSON line.

The validation case renders validation.steps sampling steps (the preset's: 40, as the official inference);
`--validation-steps N` shortens it to fit a call, `--no-validation` leaves it out.

`--tiny` runs the same path on the CPU with the tiny model (a test of this script; it measures nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import emit_result, peak, sample_memory, step_durations  # noqa: E402
from engine.gpu import host_memory  # noqa: E402

GIB = 2**30
WARMUP_STEPS = 2  # step 1 compiles the no-grad forward, step 2 can still hit the recompute's compile
FULL = {"size": (832, 480), "clips": 3, "seconds": 11.0}  # 11 s: two windows a clip, the second with motion
TINY = {"size": (64, 64), "clips": 1, "seconds": 10.5}  # 8x8 latents, as the demo
PROMPT = "A person looks into the camera and talks calmly, plain background, soft light."
COMPONENTS = ("transformer", "vae", "text_encoder", "audio_encoder")
# engine.memory.MemoryEstimate.summary(), as the runner logs it before loading.
PREFLIGHT = re.compile(r"memory pre-flight: predicted ([\d.]+) GiB GPU, ([\d.]+) GiB host RAM")
STOP_GRACE_S = 120  # after SIGTERM: time to write the checkpoint before the run is killed


# ---- 1. the model folder -------------------------------------------------------------------------------------
def _weights_complete(folder: Path) -> bool:
    """A component folder with its config and every weight file its index names (save_pretrained's layout)."""
    if not (folder / "config.json").is_file():
        return False
    indexes = list(folder.glob("*.safetensors.index.json"))
    if indexes:
        for index in indexes:
            shards = set(json.loads(index.read_text())["weight_map"].values())
            if not all((folder / s).is_file() and (folder / s).stat().st_size > 0 for s in shards):
                return False
        return True
    return any(p.stat().st_size > 0 for p in folder.glob("*.safetensors"))


def missing_parts(model_dir: Path) -> list[str]:
    """What the folder lacks: "transformer" and/or "encoders" (the VAE, UMT5, wav2vec2 and their processors)."""
    missing = [] if _weights_complete(model_dir / "transformer") else ["transformer"]
    encoders = all(_weights_complete(model_dir / c) for c in COMPONENTS[1:])
    processors = all((model_dir / d).is_dir() and any((model_dir / d).iterdir())
                     for d in ("tokenizer", "audio_processor"))
    return missing + ([] if encoders and processors else ["encoders"])


def _write_full_parts(folder: str, parts: list[str]) -> None:
    """The child process's work: the full-size parts, built on the GPU (a 14B fp32 model would not fit the host)."""
    import torch

    from bench.cache_speed import write_encoders
    from bench.engine_step import write_model

    if "encoders" in parts:
        write_encoders(Path(folder), False, torch.device("cuda"))
    if "transformer" in parts:
        write_model(Path(folder), False)


def ensure_model(model_dir: Path, tiny: bool) -> dict:
    """Write what the folder lacks; returns the seconds it took and what was written."""
    parts = missing_parts(model_dir)
    t0 = time.perf_counter()
    if parts and tiny:
        from engine.models.tiny import write_tiny_model

        write_tiny_model(model_dir, seed=0)
    elif parts:
        import multiprocessing

        # A spawned child: the CUDA context and the build's host memory go away with it, before the run starts.
        proc = multiprocessing.get_context("spawn").Process(target=_write_full_parts, args=(str(model_dir), parts))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"writing the model folder {model_dir} failed (exit {proc.exitcode})")
    if missing_parts(model_dir):
        raise SystemExit(f"{model_dir} is still incomplete after writing: {', '.join(missing_parts(model_dir))}")
    return {"model_written": parts, "write_model_s": round(time.perf_counter() - t0, 1)}


# ---- 2. clips, 3. the run config -----------------------------------------------------------------------------
def write_clips(folder: Path, count: int, seconds: float, size: tuple[int, int]) -> list[Path]:
    from engine.data.synth import make_talking_clip

    # espeak-ng off: the GPU image may lack it; the numpy speech gives the encoders the same amount of audio.
    return [make_talking_clip(folder, f"talk_{i:03d}", fps=25, size=size, duration_s=seconds, seed=i,
                              use_espeak=False, caption=f"Speaker {i} looks into the camera and talks.").video
            for i in range(count)]


def write_config(args, model_dir: Path, clips: list[Path], scratch: Path) -> tuple[Path, object]:
    """scratch/run.toml: `extends` the preset (by a path relative to the file) and sets only what this run adds."""
    from engine.config import load_config, save_config, with_value

    preset = REPO / "presets" / f"{args.preset}.toml"
    config = load_config(preset)
    settings = {
        "model.source": str(model_dir), "data.datasets": [{"path": str(clips[0].parent)}],
        "data.cache_dir": str(scratch / "cache"), "output.run_dir": str(scratch / "runs"),
        "output.name": f"user-run-{args.preset}", "optim.max_steps": args.steps, "logging.every_steps": 1,
    }
    if args.validation:
        settings["validation.every_steps"] = args.validate_every or args.steps
        settings["validation.cases"] = [{"reference": str(clips[0]), "audio": str(clips[0]), "prompt": PROMPT,
                                         "seed": 7}]
        if args.validation_steps:
            settings["validation.steps"] = args.validation_steps
    else:
        settings["validation.every_steps"] = 0
    if args.cap_gib:
        # memory.vram_budget_gb is in GB; the cap is given in GiB as bench/model_step.py's --vram-cap-gib.
        settings["memory.vram_budget_gb"] = round(args.cap_gib * GIB / 1e9, 2)
    if args.tiny:
        from bench.engine_step import TINY_OVERRIDES

        settings |= TINY_OVERRIDES | {"data.resolution": list(TINY["size"]), "data.bucket": "fixed"}
    for key, value in settings.items():
        config = with_value(config, key, value, file="<user_run>")
    path = scratch / "run.toml"
    save_config(config, path, extends=os.path.relpath(preset, scratch))
    return path, config


# ---- 4. the run, sampled -------------------------------------------------------------------------------------
def gpu_reader():
    """(reader of the used memory of the GPU the run gets, its name), or (None, None) without NVML."""
    from engine.gpu import default_probe

    probe = default_probe()
    if not probe.available:
        return None, None
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    index = int(first) if first.isdigit() else 0
    snap = probe.snapshot(index)

    def used() -> int | None:
        s = probe.snapshot(index)
        return s.used_bytes if s is not None else None

    return used, snap.name if snap is not None else None


def run_cli(config_path: Path, overrides: list[str], log_path: Path, timeout_s: float, tiny: bool) -> dict:
    cmd = [sys.executable, "-m", "s2v_tui.cli", "--run", str(config_path)]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    if tiny:
        env.setdefault("OMP_NUM_THREADS", "1")  # the tiny model on a shared CPU: one thread is faster (the demo's)
    read_gpu, _ = gpu_reader()
    count = iter(range(5))  # five readings 0.1 s apart: the machine before the run, this process included
    baseline = sample_memory(os.getpid(), lambda: next(count, None) is None, 0.1, read_gpu)
    with open(log_path, "w") as log:
        started = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        state = {"term_at": None}

        def done() -> bool:
            if proc.poll() is not None:
                return True
            age = time.time() - started
            if timeout_s and age > timeout_s and state["term_at"] is None:
                proc.send_signal(signal.SIGTERM)  # the run writes a checkpoint and exits 75
                state["term_at"] = age
            elif state["term_at"] is not None and age > state["term_at"] + STOP_GRACE_S:
                proc.kill()
            return False

        samples = sample_memory(proc.pid, done, 0.2, read_gpu)
        code = proc.wait()
    return {"cmd": cmd[1:], "code": code, "started": started, "ended": time.time(), "samples": samples,
            "baseline": baseline, "terminated_at_s": state["term_at"]}


# ---- 5. what the run folder says -----------------------------------------------------------------------------
def parse_preflight(text: str) -> tuple[float | None, float | None]:
    """(GPU GiB, host GiB) of the last pre-flight prediction in a train.log, or (None, None)."""
    found = PREFLIGHT.findall(text)
    return (float(found[-1][0]), float(found[-1][1])) if found else (None, None)


def phase_spans(events, end_ts: float) -> list[tuple[str, float, float]]:
    """(phase, start, end) for every PhaseChanged of one run, each ending where the next begins."""
    changes = [e for e in events if e.kind == "phase_changed"]
    ends = [e.ts for e in changes[1:]] + [end_ts]
    return [(e.phase, e.ts, end) for e, end in zip(changes, ends)]


def read_run(run_dir: Path) -> dict:
    from engine.event_log import read_events

    path = run_dir / "events.jsonl"
    events = read_events(path) if path.exists() else []
    starts = [i for i, e in enumerate(events) if e.kind == "run_started"]
    events = events[starts[-1]:] if starts else events  # this run, if the folder held an earlier one
    log = run_dir / "train.log"
    gpu, host = parse_preflight(log.read_text(errors="replace") if log.exists() else "")
    if gpu is None:  # the same line also went to events.jsonl as a log event
        gpu, host = parse_preflight("\n".join(e.message for e in events if e.kind == "log"))
    ended = next((e for e in reversed(events) if e.kind == "run_ended"), None)
    return {"events": events, "steps": [e for e in events if e.kind == "step_end"], "ended": ended,
            "run_started": events[0].ts if starts else None, "predicted_gpu_gib": gpu, "predicted_host_gib": host}


# ---- 6. the result -------------------------------------------------------------------------------------------
def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


def summarise(run: dict, parsed: dict) -> dict:
    samples, steps = run["samples"], parsed["steps"]
    durations = step_durations(steps)
    timed = durations[WARMUP_STEPS:]
    origin = parsed["run_started"] or run["started"]
    end_ts = parsed["ended"].ts if parsed["ended"] else run["ended"]
    phases: dict[str, dict] = {}
    for name, start, end in phase_spans(parsed["events"], end_ts):
        p = phases.setdefault(name, {"start_s": round(start - origin, 1), "s": 0.0, "peak_rss_gib": None})
        p["s"] = round(p["s"] + end - start, 1)  # validate comes back to train: their spans add up
        rss = _gib(peak(samples, "tree_rss", start, end))
        if rss is not None and (p["peak_rss_gib"] is None or rss > p["peak_rss_gib"]):
            p["peak_rss_gib"] = rss
    base = run["baseline"]
    peak_rss, peak_proc = _gib(peak(samples, "tree_rss")), _gib(peak(samples, "rss"))
    predicted_host = parsed["predicted_host_gib"]
    alloc = max((e.peak_alloc_bytes or 0 for e in steps), default=0) or None
    reserved = max((e.peak_reserved_bytes or 0 for e in steps), default=0) or None
    return {
        # Negative: killed by that signal (-9: the kernel's OOM killer, or the grace after --timeout-s ran out).
        "exit_code": run["code"], "status": parsed["ended"].status if parsed["ended"] else None,
        "reason": parsed["ended"].reason if parsed["ended"] else None, "steps": len(steps),
        "s_per_step": round(statistics.median(timed), 3) if timed else None,
        "s_all": [round(d, 3) for d in durations],
        "peak_rss_gib": peak_rss, "peak_proc_rss_gib": peak_proc,
        "peak_system_used_gib": _gib(peak(samples, "system_used")),
        # The tree's PSS splits shared library pages between the compile workers and the CLI: the tree's real
        # share of the host; the workers' USS is what they hold privately.
        "peak_tree_pss_gib": _gib(peak(samples, "tree_pss")),
        "peak_children_uss_gib": _gib(peak(samples, "children_uss")),
        "baseline_system_used_gib": _gib(int(statistics.median(s.system_used for s in base))) if base else None,
        "peak_gpu_alloc_gib": _gib(alloc), "peak_gpu_reserved_gib": _gib(reserved),
        "peak_gpu_used_gib_nvml": _gib(peak(samples, "gpu_used")),
        "baseline_gpu_used_gib_nvml": _gib(peak(base, "gpu_used")),
        "predicted_gpu_gib": parsed["predicted_gpu_gib"], "predicted_host_gib": predicted_host,
        # The tree is what the OOM killer weighs; the process alone is what the memory model predicts.
        "host_measured_over_predicted": round(peak_rss / predicted_host, 3) if peak_rss and predicted_host else None,
        "proc_rss_over_predicted": round(peak_proc / predicted_host, 3) if peak_proc and predicted_host else None,
        "phases": phases, "samples": len(samples), "run_s": round(run["ended"] - run["started"], 1),
        "terminated_at_s": run["terminated_at_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="24gb", help="presets/<name>.toml to extend (default: %(default)s)")
    ap.add_argument("--cap-gib", type=float, default=0.0, help="GPU memory cap in GiB (memory.vram_budget_gb)")
    ap.add_argument("--steps", type=int, default=14, help="optim.max_steps (default: %(default)s)")
    ap.add_argument("--clips", type=int, help=f"synthetic clips (default {FULL['clips']}; {TINY['clips']} with --tiny)")
    ap.add_argument("--seconds", type=float, help=f"seconds a clip (default {FULL['seconds']:g}; {TINY['seconds']:g} with --tiny)")
    ap.add_argument("--no-validation", dest="validation", action="store_false", help="no validation case")
    ap.add_argument("--validate-every", type=int, default=0, help="validation.every_steps (default: at the last step)")
    ap.add_argument("--validation-steps", type=int, default=0, help="validation.steps (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to s2v-tui --run --set")
    ap.add_argument("--model-dir", help="the model folder, written when incomplete (default: .user-run/model; "
                                        "with --tiny, in the scratch folder)")
    ap.add_argument("--scratch", help="parent of this call's folder (default: .user-run in the repository root)")
    ap.add_argument("--keep", action="store_true", help="keep this call's folder (clips, cache, run folder)")
    ap.add_argument("--timeout-s", type=float, default=0.0, help="SIGTERM the run at this age (0: never)")
    ap.add_argument("--out", help="append the result as one JSON line to this file")
    ap.add_argument("--tiny", action="store_true", help="tiny model and clips on the CPU (tests this script)")
    args = ap.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    clips_n, seconds = args.clips or sizes["clips"], args.seconds or sizes["seconds"]
    if not args.tiny and gpu_reader()[0] is None:
        ap.error("the 14B run needs an NVIDIA GPU; use --tiny on a CPU machine")
    parent = Path(args.scratch or REPO / ".user-run")
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{args.preset}-", dir=parent))
    t0 = time.perf_counter()
    try:
        model_dir = Path(args.model_dir) if args.model_dir else (scratch / "model" if args.tiny else parent / "model")
        written = ensure_model(model_dir, args.tiny)
        t_clips = time.perf_counter()
        clips = write_clips(scratch / "clips", clips_n, seconds, sizes["size"])
        clips_s = time.perf_counter() - t_clips
        config_path, config = write_config(args, model_dir, clips, scratch)
        from engine.config import parse_override, with_value

        for item in args.set:  # as the CLI will apply them: the run folder is where they put it
            config = with_value(config, *parse_override(item), file="--set")
        run = run_cli(config_path, args.set, scratch / "s2v-tui.out", args.timeout_s, args.tiny)
        parsed = read_run(config.run_path())
        result = {"bench": "user_run", "tiny": args.tiny, "preset": args.preset, "cap_gib": args.cap_gib or None,
                  "vram_budget_gb": config.memory.vram_budget_gb or None, "steps_asked": args.steps,
                  "clips": clips_n, "clip_seconds": seconds, "size": "x".join(map(str, sizes["size"])),
                  "validation": args.validation, "overrides": args.set, "model_dir": str(model_dir), **written,
                  "write_clips_s": round(clips_s, 1), **summarise(run, parsed),
                  "system_total_gib": _gib(host_memory().total_bytes),
                  "device": gpu_reader()[1] or "cpu",
                  "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
        if run["code"] != 0:
            result["output_tail"] = (scratch / "s2v-tui.out").read_text(errors="replace")[-2000:]
        result["total_s"] = round(time.perf_counter() - t0, 1)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    emit_result(result, args.out)
    return 0 if run["code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
