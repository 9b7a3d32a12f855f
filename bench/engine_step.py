"""Time LoRA training steps of the full 14B S2V model through the engine (`engine.runner.run`), not the bare model.

Next session, on the H100 (one call each, from the repository root, `carry: [".whl"]`, timeout_s 600). The
ignored .whl folder must hold diffusers 0.42.1, importlib_metadata, zipp (as for bench/model_step.py in
BENCHMARKS.md) and tomlkit 0.15.2 (engine.config reads the presets with it; the GPU image lacks it), plus av 18.1.0
for bench/cache_speed.py; all five were fetched into /work/main/.whl on 2026-11-25 (41 MB; the device README's
`pip download` line refetches any that is missing):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1; python3 bench/engine_step.py --preset 80gb --mode first --steps 6 --json $OUT/engine_step.jsonl

    (same preamble) python3 bench/engine_step.py --preset 24gb --mode first --steps 6 --vram-budget-gb 25.77 --json $OUT/engine_step.jsonl

25.77 GB is the 24 GiB cap that bench/model_step.py --vram-cap-gib 24 used. `--mode continuation` times the run
with motion latents (motion_drop_prob 0.0). `--bare` also times bench/model_step.py with the preset's switches at
the same 20 latents in a subprocess (about 3 more minutes: leave it out of a call that is near the 10-minute limit).

What it does: builds the 14B transformer with random bf16 weights on the GPU (meta + to_empty, as model_step.py),
writes it with save_pretrained (32.6 GB, 5 GB shards) to a scratch folder on local disk (`--scratch`, default a
hidden folder in the repository root, which is on the machine's disk: /tmp may be memory-backed), frees the GPU,
then runs the engine's whole job (check, load with from_pretrained, LoRA, memory switches, train N steps, export)
on an in-memory dataset of 14B-shaped 832x480 windows: latents [16,20,60,104], motion [16,19,60,104], ref
[16,1,60,104], text [512,4096], audio [25,1024,80]. s/step is the median of the steps after the first 2 (the
compile warm-up); peak GPU memory is the last StepEnd's (the peak of the whole run, loading included); host RSS
is the process peak. Prints one JSON line and appends it to --json. The scratch folder is removed at the end.

Several GPUs (the distributed issue): write the folder once, then launch the same script on N processes:

    python3 bench/engine_step.py --write-model .bench-model
    python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no bench/engine_step.py --model-dir .bench-model --scratch .bench-runs --strategy ddp \
        --preset 80gb --steps 6 --json $OUT/dist.jsonl

Each rank trains batch optim.batch_size on its own slice of the global batch; rank 0 reports the step time, the
samples per second of the whole job and every rank's peak memory (StepEnd.rank_*). `--model-dir` reuses a
folder (never removed); `--scratch` is then required so that every rank writes into the same run folder.

The cost of [rollout] (scheduled sampling): the same command with `--set rollout.enabled=true --set
rollout.probability=1.0 --steps 12`, against the preset without it; the result's `rollout_forwards` lists the
no-grad forwards of each step (its largest offset, 0..rollout.max_step_offset), to set beside `s_all`.

TREAD token routing (config [tread], issue 20), against the same preset without it (the first command above):

    (same preamble) python3 bench/engine_step.py --preset 80gb --mode first --steps 6 --set tread.enabled=true --set tread.selection_ratio=0.25 --json $OUT/engine_step.jsonl
    (same preamble) python3 bench/engine_step.py --preset 80gb --mode first --steps 6 --set tread.enabled=true --set tread.selection_ratio=0.5 --json $OUT/engine_step.jsonl

The JSON line's "tread" field holds the settings of the row (span: tread.start_layer_idx / end_layer_idx, default
2 and -2, blocks 2..38 of the 40).

CREPA (`--set crepa.enabled=true`): the samples also carry DINOv2-giant-shaped features [20, 15, 26, 1536] (random,
like the other inputs; in a real run the cache phase computes them and the encoder is never held while training).
Training reads only the encoder's config.json (its feature width), so unless crepa.encoder names an existing folder
the bench writes the DINOv2-giant configuration (no weights) to <model>/dinov2 and points crepa.encoder there:

    (same preamble) python3 bench/engine_step.py --preset 80gb --mode first --steps 6 --set crepa.enabled=true --json $OUT/engine_step.jsonl

`--tiny` runs the same path with engine.models.tiny and tiny samples on the CPU (a test of this script).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Self

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import check_host_budget, emit_result, peak_host_rss_gib, step_durations  # noqa: E402
from engine.config import with_value  # noqa: E402
from engine.models.attention import get_attention_backend  # noqa: E402
from engine.config.toml_io import load_config  # noqa: E402
from engine.train.synthetic import SyntheticLatentDataset  # noqa: E402

WARMUP_STEPS = 2  # step 1 compiles the no-grad forward, step 2 can still hit the recompute's compile
MAX_STEPS = 20  # a short measurement: the step time settles after the warm-up

# 832x480 at 16 fps, 80-frame windows: 20 latents of 60x104, 19 motion latents; UMT5-XXL and wav2vec2-large.
FULL_SAMPLE = dict(latent_frames=20, height=60, width=104, text_dim=4096, audio_layers=25, audio_dim=1024,
                   text_tokens=40)
# Settings no preset can run on the CPU (pinned memory, CUDA streams, cuDNN, a C++ compiler for inductor):
# the tiny proof keeps the engine path and drops only these.
TINY_OVERRIDES = {
    "model.dtype": "fp32", "train.mixed_precision": "no", "memory.block_offload": False,
    "memory.offload_checkpoint_inputs": False, "memory.compile_blocks": False,
    "memory.attention_backend": "auto",
}


class RolloutForwards(logging.Handler):
    """Collects the no-grad forwards of each rolled-out micro-batch from engine.train.rollout's debug line, so the
    step times of a run with [rollout] can be set against how many extra forwards each step ran."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: list[int] = []
        self._logger = logging.getLogger("engine.train.rollout")

    def emit(self, record: logging.LogRecord) -> None:
        self.counts.append(int(record.args[0]))

    def __enter__(self) -> Self:
        self._saved = self._logger.level, self._logger.propagate
        self._logger.setLevel(logging.DEBUG)
        self._logger.propagate = False  # a debug line per step is not for train.log
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]


def write_model(folder: Path, tiny: bool) -> float:
    """The transformer folder model.source points at; returns the seconds it took."""
    t0 = time.perf_counter()
    if tiny:
        from engine.models.tiny import write_tiny_model

        write_tiny_model(folder, seed=0)
    else:
        from bench.model_step import random_14b

        # Built on the GPU in bf16: a 14B fp32 model on the host would need 65 GB of RAM.
        model = random_14b(torch.device("cuda"))
        model.save_pretrained(folder / "transformer", max_shard_size="5GB")
        del model
        gc.collect()
        torch.cuda.empty_cache()
        # The engine's peak should be its own, not the build's.
        torch.cuda.reset_peak_memory_stats()
    return time.perf_counter() - t0


# facebook/dinov2-giant's configuration (its config.json): what crepa.encoder names by default.
DINOV2_GIANT = {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "mlp_ratio": 4,
                "patch_size": 14, "image_size": 518, "use_swiglu_ffn": True, "layerscale_value": 1.0}


def crepa_encoder(config, model_dir: Path):
    """With crepa.enabled: point crepa.encoder at a DINOv2 folder (the tiny model's own, or the giant's config
    written here) unless it already names an existing folder. Returns the config and the feature width."""
    from engine.data.crepa_features import feature_dim

    if not Path(config.crepa.encoder).expanduser().is_dir():
        folder = model_dir / "dinov2"
        if not (folder / "config.json").is_file():
            from transformers import Dinov2Config

            Dinov2Config(**DINOV2_GIANT).save_pretrained(folder)
        config = with_value(config, "crepa.encoder", str(folder), file="<engine_step>")
    return config, feature_dim(config.crepa.encoder)


def make_dataset(tiny: bool, mode: str, crepa_dim: int = 0) -> SyntheticLatentDataset:
    # Motion latents are kept in first mode too: the batcher drops them (motion_drop_prob 1.0), as with real data.
    ds = SyntheticLatentDataset(2, **({} if tiny else FULL_SAMPLE), with_motion=True, seed=0, crepa_dim=crepa_dim)
    if not tiny:
        # The cache stores text and audio features in bf16 (cache_plan.CacheSettings.feature_store); the batcher
        # moves samples as they come, so this keeps the host-to-device copies the real run has.
        for s in ds.samples:
            for key in ("text", "text_empty", "audio", "crepa"):
                if key in s:
                    s[key] = s[key].to(torch.bfloat16)
    return ds


def build_config(args, model_dir: Path, runs_dir: Path):
    config = load_config(REPO / "presets" / f"{args.preset}.toml")
    settings = {
        "model.source": str(model_dir),
        "output.run_dir": str(runs_dir),
        "output.name": f"engine-step-{args.preset}-{args.mode}",
        "optim.max_steps": args.steps,
        "data.motion_drop_prob": 1.0 if args.mode == "first" else 0.0,
        "checkpoint.every_steps": 0,  # only the final checkpoint: no save between the timed steps
        "logging.every_steps": 1,
        "logging.tensorboard": False,
        "validation.every_steps": 0,
    }
    if args.vram_budget_gb:
        settings["memory.vram_budget_gb"] = args.vram_budget_gb
    if args.strategy:
        settings["distributed.strategy"] = args.strategy
        if args.strategy == "fsdp":
            # FSDP2 re-gathers a block's weights for the recompute; our re-entrant offloaded checkpoint cannot
            # (engine.train.allowed.setting_problems), so the sharded run keeps block inputs on the GPU.
            settings["memory.offload_checkpoint_inputs"] = False
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE with a TOML value, e.g. memory.base_weights='\"fp8\"'")
        settings[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    if args.tiny:
        settings.update(TINY_OVERRIDES)
    for key, value in settings.items():
        config = with_value(config, key, value, file="<engine_step>")
    return config


def bare_command(config, mode: str, steps: int) -> list[str]:
    """bench/model_step.py with the preset's switches at the engine's window size (77 frames = 20 latents)."""
    m = config.memory
    cmd = [sys.executable, str(REPO / "bench" / "model_step.py"), "--mode", mode, "--frames", "77",
           "--rank", str(config.lora.rank), "--residual", m.residual_dtype, "--steps", str(steps), "--warmup", "1"]
    if m.attention_backend != "auto":
        cmd += ["--attention", m.attention_backend]
    if m.compile_blocks:
        cmd.append("--compile")
    if m.offload_checkpoint_inputs:
        cmd.append("--offload-inputs")
        if m.gpu_saved_inputs:
            cmd += ["--gpu-saved-inputs", str(m.gpu_saved_inputs)]
    if m.block_offload:
        cmd += ["--stream-blocks", str(m.blocks_resident)]
    if m.vram_budget_gb:
        cmd += ["--vram-cap-gib", f"{m.vram_budget_gb * 1e9 / 2**30:.2f}"]
    if not m.gradient_checkpointing:
        cmd.append("--no-checkpointing")
    if m.checkpoint_policy != "full":
        cmd += ["--policy", m.checkpoint_policy]
    if m.base_weights != "bf16":
        cmd += ["--base-weights", m.base_weights]
    if m.fp8_input_grad:
        cmd.append("--fp8-backward")
    return cmd


def run_bare(config, mode: str, steps: int) -> dict:
    cmd = bare_command(config, mode, steps)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-800:]}", "command": " ".join(cmd[1:])}
    bare = json.loads(lines[-1])
    return {k: bare[k] for k in ("s_per_step", "s_all", "peak_alloc_gib", "peak_reserved_gib", "peak_host_rss_gib",
                                 "tokens", "mfu")} | {"command": " ".join(cmd[1:])}


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="80gb", help="presets/<name>.toml to extend (default: %(default)s)")
    ap.add_argument("--mode", choices=("first", "continuation"), default="first",
                    help="first: motion_drop_prob 1.0; continuation: 0.0 (every step with 19 motion latents)")
    ap.add_argument("--steps", type=int, default=6, help=f"training steps, {WARMUP_STEPS + 1}..{MAX_STEPS}")
    ap.add_argument("--vram-budget-gb", type=float, default=0.0, help="memory.vram_budget_gb (emulate a smaller card)")
    ap.add_argument("--host-budget-gib", type=float, default=0.0,
                    help="emulate the host too: fail (exit 2) when the peak host RSS exceeds this")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key with a TOML value, e.g. --set memory.checkpoint_policy='\"save_attention\"'")
    ap.add_argument("--bare", action="store_true", help="also time bench/model_step.py with the same switches")
    ap.add_argument("--scratch", help="folder for the model and the run (removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    ap.add_argument("--tiny", action="store_true", help="tiny model and samples on the CPU (tests this script)")
    ap.add_argument("--write-model", metavar="DIR", help="only write the model folder to DIR and exit")
    ap.add_argument("--encoders", action="store_true",
                    help="with --write-model: write only the full-size VAE, UMT5 and wav2vec2 (bench/cache_speed.py) "
                         "into DIR, beside a transformer/ written by another --write-model (bench/sample_speed.py)")
    ap.add_argument("--model-dir", help="use this model folder (written by --write-model) instead of a new one")
    ap.add_argument("--strategy", choices=("ddp", "fsdp"), help="distributed.strategy (under accelerate launch)")
    args = ap.parse_args(argv)
    if args.write_model:
        if not args.tiny and not torch.cuda.is_available():
            ap.error("the 14B model is built on a CUDA GPU; use --tiny on a CPU machine")
        if args.encoders:
            from bench.cache_speed import write_encoders

            t0 = time.perf_counter()
            write_encoders(Path(args.write_model), args.tiny, torch.device("cpu" if args.tiny else "cuda"))
            seconds = time.perf_counter() - t0
        else:
            seconds = write_model(Path(args.write_model), args.tiny)
        print(json.dumps({"bench": "engine_step", "wrote": args.write_model, "write_model_s": round(seconds, 1)}))
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not args.scratch:
        ap.error("under accelerate launch, --scratch must name one folder that every rank shares")
    if not WARMUP_STEPS < args.steps <= MAX_STEPS:
        ap.error(f"--steps must be in {WARMUP_STEPS + 1}..{MAX_STEPS}")
    if not args.tiny and not torch.cuda.is_available():
        ap.error("the 14B run needs a CUDA GPU; use --tiny on a CPU machine")
    if args.bare and build_config(args, REPO, REPO).tread.enabled:  # the settings alone, before minutes of work
        # model_step.py has no token routing: its row would be the step without TREAD, under a TREAD label.
        ap.error("--bare times bench/model_step.py, which does not route tokens: leave --bare out of a TREAD run")

    from engine.runner import run

    device = "cpu" if args.tiny else "cuda"
    if world > 1:
        # One run folder for all ranks (rank 0 writes it); the caller owns and removes the scratch folder.
        scratch = Path(args.scratch) / f"{args.strategy or 'ddp'}-{world}-{args.preset}-{args.mode}"
        args.keep = True
    else:
        parent = args.scratch or (None if args.tiny else str(REPO))
        if parent:
            Path(parent).mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".engine-step-", dir=parent))
    t0 = time.perf_counter()
    try:
        model_dir = Path(args.model_dir) if args.model_dir else scratch / "model"
        write_s = 0.0 if args.model_dir else write_model(model_dir, args.tiny)
        config = build_config(args, model_dir, scratch / "runs")
        crepa_dim = 0
        if config.crepa.enabled:
            config, crepa_dim = crepa_encoder(config, model_dir)
        dataset = make_dataset(args.tiny, args.mode, crepa_dim)
        events = []
        phase_at: dict[str, float] = {}

        def collect(event) -> None:
            if event.kind == "phase_changed":
                phase_at.setdefault(event.phase, time.perf_counter())
            events.append(event)

        forwards = RolloutForwards()
        run_start = time.perf_counter()
        with forwards:
            end = run(config, [collect], threading.Event(), scratch / "runs" / "run", dataset=dataset, device=device)
        run_s = time.perf_counter() - run_start
        steps = [e for e in events if e.kind == "step_end"]
        durations = step_durations(steps)
        timed = durations[WARMUP_STEPS:]
        walls = [b.ts - a.ts for a, b in zip(steps, steps[1:])][WARMUP_STEPS - 1:]
        last = steps[-1] if steps else None
        result = {
            "bench": "engine_step", "preset": args.preset, "mode": args.mode, "tiny": args.tiny,
            "status": end.status, "reason": end.reason, "steps": len(steps),
            "s_per_step": round(statistics.median(timed), 3) if timed else None,
            "s_all": [round(d, 3) for d in durations],
            # Between StepEnd events: the step plus whatever the loop does between steps (logging, events).
            "s_per_step_wall": round(statistics.median(walls), 3) if walls else None,
            "peak_alloc_gib": gib(max((e.peak_alloc_bytes or 0 for e in steps), default=0) or None),
            "peak_reserved_gib": gib(max((e.peak_reserved_bytes or 0 for e in steps), default=0) or None),
            "step_host_rss_gib": gib(max((e.host_rss_bytes or 0 for e in steps), default=0) or None),
            "peak_host_rss_gib": peak_host_rss_gib(),
            "loss": round(last.loss, 4) if last else None,
            "write_model_s": round(write_s, 1), "run_s": round(run_s, 1),
            "load_s": round(phase_at["train"] - phase_at["load"], 1) if {"load", "train"} <= phase_at.keys() else None,
            "switches": {k: getattr(config.memory, k) for k in (
                "gradient_checkpointing", "offload_checkpoint_inputs", "block_offload", "blocks_resident",
                "compile_blocks", "residual_dtype", "attention_backend", "vram_budget_gb", "checkpoint_policy",
                "base_weights", "fp8_input_grad")},
            "overrides": args.set,
            # the kernel the run trained with ("fastest" is resolved by the switches)
            "attention_backend_used": get_attention_backend(),
            # [rollout]: the no-grad forwards of each micro-batch (its largest offset), to set beside s_all.
            "rollout_forwards": forwards.counts,
            # TREAD's settings (config [tread]): off, or the ratio and span a timing row was taken with.
            "tread": dataclasses.asdict(config.tread),
            "crepa": {"enabled": config.crepa.enabled, "block_index": config.crepa.block_index,
                      "feature_dim": crepa_dim},
            "lora_rank": config.lora.rank, "resolution": list(config.data.resolution),
            "world_size": world, "strategy": args.strategy if world > 1 else "single",
            "batch_per_rank": config.optim.batch_size,
            # Every rank's peak (rank order), from rank 0's StepEnd events; empty in one process.
            "rank_peak_alloc_gib": [gib(max((e.rank_peak_alloc_bytes[r] or 0 for e in steps), default=0) or None)
                                    for r in range(world)] if world > 1 and steps and steps[-1].rank_peak_alloc_bytes else [],
            "rank_peak_reserved_gib": [gib(max((e.rank_peak_reserved_bytes[r] or 0 for e in steps), default=0) or None)
                                       for r in range(world)] if world > 1 and steps and steps[-1].rank_peak_reserved_bytes else [],
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        }
        if args.bare and not args.tiny:
            del dataset, events, steps
            gc.collect()
            torch.cuda.empty_cache()
            # The bare step's own process: its peak memory and compile caches are not mixed with the run's.
            result["bare"] = run_bare(config, args.mode, max(2, len(timed)))
        if result["s_per_step"]:
            result["samples_per_s"] = round(world * config.optim.batch_size / result["s_per_step"], 4)
        result["total_s"] = round(time.perf_counter() - t0, 1)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    within = True
    if rank == 0:
        within = check_host_budget(result, args.host_budget_gib)
        emit_result(result, args.json)
    if result["status"] != "completed":
        return 1
    return 0 if within else 2


if __name__ == "__main__":
    sys.exit(main())
