"""Time one validation sample of the full 14B S2V model through the engine's validation path, under a preset's cap.

On the GPU machine (from the repository root, `carry: [".whl"]`; the .whl folder as for bench/engine_step.py,
av included: the validation case is a synthetic clip):

    python3 bench/sample_speed.py --preset 24gb --vram-budget-gb 25.77 --json $OUT/sample_speed.jsonl

What it does, in the order a training run does it (engine.runner._run_phases):
1. writes a model folder with random weights and the real architectures: transformer/ (the 14B model, as
   bench/engine_step.py writes it) and the encoders (bench/cache_speed.py: Wan VAE, UMT5-XXL, wav2vec2-large);
   `--model-dir` reuses such a folder instead (both writers fill one folder);
2. caps the GPU memory (memory.vram_budget_gb, set before anything reaches the GPU, as the runner does);
3. encodes one validation case (a synthetic 832x480 talking clip: first frame as reference, its audio, a prompt)
   with engine.train.validation.prepare_validation, which frees UMT5 and wav2vec2 afterwards;
4. loads the transformer with the preset's memory switches and the LoRA (engine.runner._load_model: block
   streaming from pinned host memory for the 24 GB preset);
5. renders the sample as Validator does (VAE moved to the GPU, S2VPipeline.render with validation.steps,
   cfg_scale and solver, the case's seed; one 80-frame chunk = 77 frames at 16 fps) and writes the mp4 with the
   driving audio.
Reports the time of each phase, every denoising step's time (the first includes the compile of the no-grad
forward), the peak GPU memory of the render (the peak is reset after the load) and of the whole process, the
process's peak host RSS, and the mp4's frame count and duration. Prints one JSON line and appends it to --json.

`--tiny` runs the same path on the CPU with engine.models.tiny (a test of this script).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine_step import TINY_OVERRIDES as TINY_STEP_OVERRIDES  # noqa: E402
from bench.engine_step import gib  # noqa: E402
from bench.report import emit_result, peak_host_rss_gib  # noqa: E402
from engine.config import with_value  # noqa: E402
from engine.config.toml_io import load_config  # noqa: E402

PROMPT = "A woman looks into the camera and talks calmly, plain background, soft light."
# CPU-only settings for --tiny: bench/engine_step's, and a picture size the reference rule accepts.
TINY_OVERRIDES = {**TINY_STEP_OVERRIDES, "data.resolution": [64, 64]}


def write_full_model(folder: Path, tiny: bool) -> float:
    t0 = time.perf_counter()
    if tiny:
        from engine.models.tiny import write_tiny_model

        write_tiny_model(folder, seed=0)
    else:
        from bench.cache_speed import write_encoders
        from bench.engine_step import write_model

        write_encoders(folder, False, torch.device("cuda"))
        write_model(folder, False)
    return time.perf_counter() - t0


def build_config(args, model_dir: Path, clip: Path):
    config = load_config(REPO / "presets" / f"{args.preset}.toml")
    settings = {
        "model.source": str(model_dir),
        "validation.every_steps": 1,
        "validation.cases": [{"reference": str(clip), "audio": str(clip), "prompt": PROMPT, "seed": 7}],
        "validation.steps": args.steps,
    }
    if args.vram_budget_gb:
        settings["memory.vram_budget_gb"] = args.vram_budget_gb
    if args.tiny:
        settings.update(TINY_OVERRIDES)
    for key, value in settings.items():
        config = with_value(config, key, value, file="<sample_speed>")
    return config


def mp4_facts(path: Path) -> dict:
    import av

    # Every stream property is read while the container is open: after close PyAV's stream objects point at
    # freed memory (an early version of this script read the rate after the `with` and got garbage).
    with av.open(str(path)) as box:
        video = box.streams.video[0]
        facts = {"fps": float(video.average_rate), "width": video.width, "height": video.height}
        facts["frames"] = sum(1 for _ in box.decode(video))
    with av.open(str(path)) as box:
        audio = box.streams.audio[0] if box.streams.audio else None
        facts["audio_s"] = (round(sum(f.samples for f in box.decode(audio)) / audio.rate, 3)
                            if audio is not None else None)
    return facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="24gb", help="presets/<name>.toml (default: %(default)s)")
    ap.add_argument("--vram-budget-gb", type=float, default=0.0, help="memory.vram_budget_gb (emulate a smaller card)")
    ap.add_argument("--steps", type=int, default=40, help="validation.steps (default: %(default)s, the official)")
    ap.add_argument("--model-dir", help="a folder with transformer/ and the encoders, instead of writing one")
    ap.add_argument("--scratch", help="folder for the model, the clip and the sample (removed at the end)")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (tests this script)")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        ap.error("the 14B sample needs a CUDA GPU; use --tiny on a CPU machine")

    from engine.data.synth import make_talking_clip
    from engine.dtypes import AUTOCAST_DTYPES
    from engine.infer.pipeline import S2VPipeline
    from engine.infer.sampler import SampleOptions
    from engine.infer.video_io import write_sample_mp4
    from engine.runner import _load_model
    from engine.train.switches import cap_gpu_memory
    from engine.train.validation import prepare_validation

    device = torch.device("cpu" if args.tiny else "cuda")
    scratch = Path(tempfile.mkdtemp(prefix=".sample-speed-", dir=args.scratch or (None if args.tiny else str(REPO))))
    times: dict[str, float] = {}
    try:
        model_dir = Path(args.model_dir) if args.model_dir else scratch / "model"
        if not args.model_dir:
            times["write_model_s"] = write_full_model(model_dir, args.tiny)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        size = (64, 64) if args.tiny else (832, 480)
        clip = make_talking_clip(scratch / "case", "case", fps=25, size=size, duration_s=5.5, use_espeak=False,
                                 caption=None).video
        config = build_config(args, model_dir, clip)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cap = cap_gpu_memory(config, device)

        t0 = time.perf_counter()
        vset = prepare_validation(config, device)
        times["encode_s"] = time.perf_counter() - t0
        encode_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0

        t0 = time.perf_counter()
        model = _load_model(config, device)
        model.eval()
        times["load_s"] = time.perf_counter() - t0
        load_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0

        # What Validator._samples/_render do, with a progress callback for the per-step times.
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        v = config.validation
        options = SampleOptions(steps=v.steps, cfg_scale=v.cfg_scale, solver=v.solver, shift=v.flow_shift,
                                sigma_schedule=v.sigma_schedule, seed=v.cases[0].seed)
        stamps: list[float] = []
        t0 = time.perf_counter()
        vset.parts.vae.to(device)
        pipe = S2VPipeline(model, vset.parts, device, AUTOCAST_DTYPES.get(config.train.mixed_precision))
        cond = vset.cases[0]
        frames = pipe.render(cond, options, progress=lambda done, total: stamps.append(time.perf_counter()))
        if device.type == "cuda":
            torch.cuda.synchronize()
        denoise_end = stamps[-1] if stamps else t0
        audio = cond.audio.waveform[: round(frames.shape[0] / 16 * 16000)]
        out = write_sample_mp4(scratch / "case-00.mp4", frames.numpy(), audio)
        times["sample_s"] = time.perf_counter() - t0
        step_s = [b - a for a, b in zip([t0, *stamps], stamps)]
        facts = mp4_facts(out)
        result = {
            "bench": "sample_speed", "preset": args.preset, "tiny": args.tiny, "cap": cap,
            "steps": v.steps, "cfg_scale": v.cfg_scale, "solver": v.solver, "chunks": v.chunks,
            "size": [cond.width, cond.height], **{k: round(t, 1) for k, t in times.items()},
            "denoise_s": round(denoise_end - t0, 1),
            # The last progress call comes after the last model call; decode and mp4 writing follow it.
            "decode_and_write_s": round(time.perf_counter() - denoise_end, 1) if stamps else None,
            "step_s_first": round(step_s[0], 2) if step_s else None,
            "step_s_median": round(statistics.median(step_s[1:]), 3) if len(step_s) > 1 else None,
            "sample_peak_alloc_gib": gib(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None,
            "sample_peak_reserved_gib": gib(torch.cuda.max_memory_reserved()) if device.type == "cuda" else None,
            "encode_peak_alloc_gib": gib(encode_peak) if device.type == "cuda" else None,
            "load_peak_alloc_gib": gib(load_peak) if device.type == "cuda" else None,
            "peak_host_rss_gib": peak_host_rss_gib(),
            "mp4": facts,
            "switches": {k: getattr(config.memory, k) for k in (
                "block_offload", "blocks_resident", "compile_blocks", "attention_backend", "vram_budget_gb")},
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    emit_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
