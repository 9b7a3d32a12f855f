"""`s2v-tui demo [--out DIR]`: the whole pipeline on the CPU in well under a minute, with nothing to download.

It writes a tiny S2V model (same classes and folder layout as the real one) and two synthetic talking clips
(engine.data.synth), then runs the same job as `s2v-tui --run`: check, cache (tiny VAE, UMT5 and wav2vec2),
train a LoRA, export it in both layouts, showing the loss going down. Run it again with the same --out and it
resumes (and finds the work done).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

DEMO_STEPS = 120
DEMO_CLIPS = 2
DEMO_CLIP_SECONDS = 10.5  # two 80-frame windows at 16 fps: a first window and one with 73 motion frames
DEMO_RESOLUTION = (64, 64)  # 8x8 latents: the smallest the motion framepack's 4x kernel takes

# The demo run's settings over the defaults: a tiny fp32 model on the CPU, a LoRA that visibly learns in
# DEMO_STEPS steps on DEMO_CLIPS clips.
DEMO_SETTINGS = {
    "model.dtype": "fp32",
    "train.mixed_precision": "no",
    "lora.rank": 8,
    "lora.alpha": 8.0,
    "optim.lr": 1.5e-2,
    "optim.schedule": "cosine",
    "optim.warmup_steps": 5,
    "optim.weight_decay": 0.0,
    "optim.max_steps": DEMO_STEPS,
    "data.caption_dropout": 0.0,
    "data.resolution": list(DEMO_RESOLUTION),
    "data.bucket": "fixed",
    "data.windows_per_clip": 2,
    "checkpoint.every_steps": 20,
    "checkpoint.keep_last": 2,
    "memory.gradient_checkpointing": False,
    "logging.every_steps": 10,
    "logging.tensorboard": False,
    "output.name": "demo-lora",
}


def demo_config(model_dir: Path, runs_dir: Path, clips_dir: Path | None = None, cache_dir: Path | None = None):
    from engine.config import Config, with_value

    config = Config()
    settings = {**DEMO_SETTINGS, "model.source": str(model_dir), "output.run_dir": str(runs_dir)}
    if clips_dir is not None:
        settings["data.datasets"] = [{"path": str(clips_dir)}]
    if cache_dir is not None:
        settings["data.cache_dir"] = str(cache_dir)
    for key, value in settings.items():
        config = with_value(config, key, value, file="<demo>")
    return config


def make_demo_clips(folder: Path) -> Path:
    """DEMO_CLIPS synthetic talking clips with captions (kept if already there)."""
    from engine.data.synth import make_talking_clip

    for i in range(DEMO_CLIPS):
        if not (folder / f"talk_{i}.mp4").exists():
            make_talking_clip(folder, f"talk_{i}", fps=25, size=DEMO_RESOLUTION, duration_s=DEMO_CLIP_SECONDS,
                              seed=i, use_espeak=False, caption=f"Speaker {i} looks into the camera and talks.")
    return folder


def prepare(out: Path):
    """The tiny model, the clips and the demo config under `out` (what exists is reused)."""
    from engine.models.tiny import write_tiny_model

    model_dir = out / "model"
    if not (model_dir / "model_index.json").exists():
        print(f"writing a tiny S2V model to {model_dir}", flush=True)
        write_tiny_model(model_dir, seed=0)
    clips = make_demo_clips(out / "clips")
    return demo_config(model_dir, out / "runs", clips, out / "cache")


def loss_summary(losses: dict[int, float]) -> str:
    steps = sorted(losses)
    first = statistics.mean(losses[s] for s in steps[:5])
    last = statistics.mean(losses[s] for s in steps[-5:])
    return (f"loss: {first:.3f} over steps {steps[0]}-{steps[4]} -> {last:.3f} over steps {steps[-5]}-{steps[-1]} "
            f"({last / first:.0%} of the start)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s2v-tui demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="s2v-demo", help="folder for the tiny model, clips and run (default: %(default)s)")
    args = parser.parse_args(argv)

    import torch

    from s2v_tui.commands.headless import EXIT_OK, run_config_headless

    # The tiny model is far faster on one thread when anything else shares the CPU (no spin-waiting threads).
    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    started = time.monotonic()
    config = prepare(out)
    print(f"training set: {DEMO_CLIPS} synthetic talking clips of {DEMO_CLIP_SECONDS:g} s in {out / 'clips'}",
          flush=True)
    losses: dict[int, float] = {}

    def collect(event) -> None:
        if event.kind == "step_end":
            losses[event.step] = event.loss

    code = run_config_headless(config, sys.stdout, device="cpu", extra_subscribers=[collect])
    if code == EXIT_OK and len(losses) >= 10:
        print(loss_summary(losses))
    print(f"demo finished in {time.monotonic() - started:.0f} s; everything is under {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
