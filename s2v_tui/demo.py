"""`s2v-tui demo [--out DIR]`: the whole pipeline on the CPU in about a minute, with nothing to download.

It writes a tiny S2V model (same classes and folder layout as the real one), makes a small training set, trains
a LoRA through the same engine and headless face as `s2v-tui --run`, exports it in both layouts and shows the
loss going down. Run it twice with the same --out and the second run resumes (and finds the work done).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

DEMO_STEPS = 80
DEMO_CLIPS = 2

# The demo run's settings over the defaults: a tiny fp32 model on the CPU, a LoRA that visibly learns in
# DEMO_STEPS steps on DEMO_CLIPS clips.
DEMO_SETTINGS = {
    "model.dtype": "fp32",
    "train.mixed_precision": "no",
    "lora.rank": 8,
    "lora.alpha": 8.0,
    "optim.lr": 1e-2,
    "optim.weight_decay": 0.0,
    "optim.max_steps": DEMO_STEPS,
    "data.caption_dropout": 0.0,
    "checkpoint.every_steps": 20,
    "checkpoint.keep_last": 2,
    "memory.gradient_checkpointing": False,
    "logging.every_steps": 10,
    "logging.tensorboard": False,
    "output.name": "demo-lora",
}


def demo_config(model_dir: Path, runs_dir: Path):
    from engine.config import Config, with_value

    config = Config()
    settings = {**DEMO_SETTINGS, "model.source": str(model_dir), "output.run_dir": str(runs_dir)}
    for key, value in settings.items():
        config = with_value(config, key, value, file="<demo>")
    return config


def demo_dataset(seed: int = 0):
    """In-memory latents shaped for the tiny model. The feature cache (VAE, UMT5, wav2vec2 over synthetic
    talking clips) replaces this once engine/data/dataset.py is in the build."""
    from engine.models.tiny import TINY_AUDIO_DIM, TINY_AUDIO_LAYERS, TINY_TEXT_DIM
    from engine.train.synthetic import SyntheticLatentDataset

    return SyntheticLatentDataset(DEMO_CLIPS, text_dim=TINY_TEXT_DIM, audio_layers=TINY_AUDIO_LAYERS + 1,
                                  audio_dim=TINY_AUDIO_DIM, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s2v-tui demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="s2v-demo", help="folder for the tiny model, data and run (default: %(default)s)")
    args = parser.parse_args(argv)

    from engine.models.tiny import write_tiny_model
    from s2v_tui.headless import EXIT_OK, run_config_headless

    out = Path(args.out).resolve()
    started = time.monotonic()
    model_dir = out / "model"
    if not (model_dir / "model_index.json").exists():
        print(f"writing a tiny S2V model to {model_dir}")
        write_tiny_model(model_dir, seed=0)
    config = demo_config(model_dir, out / "runs")
    print(f"training set: {DEMO_CLIPS} synthetic windows held in memory (the feature cache is not in this build)")
    losses: dict[int, float] = {}

    def collect(event) -> None:
        if event.kind == "step_end":
            losses[event.step] = event.loss

    code = run_config_headless(config, sys.stdout, dataset=demo_dataset(), device="cpu",
                               extra_subscribers=[collect])
    if code == EXIT_OK and len(losses) >= 10:
        steps = sorted(losses)
        first = statistics.mean(losses[s] for s in steps[:5])
        last = statistics.mean(losses[s] for s in steps[-5:])
        print(f"loss: {first:.3f} over steps {steps[0]}-{steps[4]} -> {last:.3f} over steps {steps[-5]}-{steps[-1]} "
              f"({last / first:.0%} of the start)")
    print(f"demo finished in {time.monotonic() - started:.0f} s; everything is under {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
