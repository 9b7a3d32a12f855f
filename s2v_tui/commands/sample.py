"""`s2v-tui sample`: render one speech-to-video sample with the official recipe, optionally with a LoRA.

    s2v-tui sample --model Wan-AI/Wan2.2-S2V-14B --lora run/s2v-lora_native.safetensors \
        --image face.png --audio speech.wav --prompt "a woman talks to the camera" --out talk.mp4

`--lora` also takes a checkpoint of a run, RUN_DIR@STEP (e.g. `--lora runs/s2v-lora@1500`): its LoRA file
`RUN_DIR/checkpoints/step-00001500_peft.safetensors` (the native one when there is no peft file), checked against
the checkpoint's SHA-256 record. The terminal app lists a run's checkpoints with this command ready to copy.

The video is 16 fps, 80 frames per chunk (77 for the first), as many chunks as the audio needs (or
--max-chunks), cut where the audio ends, with the driving audio muxed in (cut where the video ends).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

# the values of validation.attention_backend less "same" (there is no training run to be the same as)
SAMPLING_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fa4", "cudnn_fp8", "fastest", "sage")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s2v-tui sample", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--model", required=True, help="S2V model folder or Hugging Face hub id")
    p.add_argument("--lora", help="LoRA to apply: a file (peft/diffusers or native/ComfyUI layout), or a checkpoint "
                   "of a run as RUN_DIR@STEP (e.g. runs/s2v-lora@1500: its LoRA file)")
    p.add_argument("--image", required=True, help="reference image (or a video: its first frame)")
    p.add_argument("--audio", required=True, help="driving speech (audio file, or a video's audio track)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help="default: the official S2V negative prompt")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="strength of the LoRA (default 1 = as trained; 0 = the base model; may exceed 1)")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--steps", type=int, default=40, help="sampling steps (default 40)")
    p.add_argument("--cfg", type=float, default=4.5, help="guidance scale (default 4.5; <= 1 turns CFG off)")
    p.add_argument("--solver", choices=("unipc", "euler"), default="unipc", help="default unipc (official)")
    p.add_argument("--shift", type=float, default=3.0, help="flow shift of the sigmas (default 3), as "
                   "validation.flow_shift")
    p.add_argument("--sigma-schedule", choices=("shifted", "beta"), default="shifted",
                   help="shifted (default, official) or beta: the steps at Beta(0.6, 0.6) quantiles between the same "
                        "end points, as validation.sigma_schedule")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--size", default="832x480", help="WxH whose area bounds the video (default 832x480)")
    p.add_argument("--max-chunks", type=int, default=None, help="render at most this many 80-frame chunks")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="transformer dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--attention", choices=SAMPLING_BACKENDS, default="auto",
                   help="attention kernel (default auto: PyTorch picks; fa4 = FlashAttention 4; cudnn_fp8 = cuDNN's "
                   "e4m3 self-attention, inexact; fastest = fa4 where it runs, else cudnn; sage = "
                   "SageAttention 1, int8 Q.K, faster); refused before the model loads if it cannot run here")
    return p


def _progress(done: int, total: int) -> None:
    if done == total or done % 5 == 0:
        print(f"  step {done}/{total}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.lower().endswith(".mp4"):
        print(f"error: --out {args.out}: give a file name ending in .mp4", file=sys.stderr)
        return 2
    for flag, path in (("--image", args.image), ("--audio", args.audio)):
        if not Path(path).exists():
            print(f"error: {flag} {path} does not exist", file=sys.stderr)
            return 2
    if not math.isfinite(args.lora_scale):
        print(f"error: --lora-scale {args.lora_scale}: give a finite number", file=sys.stderr)
        return 2
    lora = None
    if args.lora:
        from engine.run_checkpoints import LoraReferenceError, checkpoint_lora

        try:
            lora = checkpoint_lora(args.lora)
        except LoraReferenceError as exc:
            print(f"error: --lora {args.lora}: {exc}", file=sys.stderr)
            return 2
    import torch

    from engine.data.windows import MODEL_FPS
    from engine.infer import NEGATIVE_PROMPT, S2VPipeline, SampleOptions, parse_size, write_sample_mp4
    from engine.infer.audio import SAMPLE_RATE
    from engine.models.attention import attention_backend_problem, resolve_attention_backend, set_attention_backend
    from engine.runner import pick_device

    try:
        max_area = parse_size(args.size)
    except ValueError as exc:
        print(f"error: --size: {exc}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.attention, why = resolve_attention_backend(args.attention, device, dtype)
    if why:
        print(f"attention: {args.attention} (--attention fastest: {why})", file=sys.stderr)
    problem = attention_backend_problem(args.attention, device)
    if problem is None and args.attention == "fa4" and dtype == "fp32":
        problem = "fa4 takes bf16 or fp16 tensors: give --dtype bf16"
    if problem is None and args.attention == "cudnn_fp8" and dtype != "bf16":
        problem = "cudnn_fp8 takes bf16 tensors: give --dtype bf16"
    if problem:
        print(f"error: --attention {args.attention}: {problem}; use --attention auto", file=sys.stderr)
        return 2
    set_attention_backend(args.attention)
    started = time.perf_counter()
    print(f"loading {args.model} on {device} ({dtype})" + (f" with {lora}" if lora else ""), file=sys.stderr)
    try:
        pipe = S2VPipeline.load(args.model, device, dtype, lora=lora)
        cond = pipe.prepare(args.image, args.audio, args.prompt, max_area=max_area, max_chunks=args.max_chunks,
                            negative_prompt=NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt)
        print(f"rendering {cond.frame_count()} frames at {cond.width}x{cond.height} ({cond.chunks} chunk(s), "
              f"{args.steps} {args.solver} steps, cfg {args.cfg}, seed {args.seed}"
              + (f", LoRA at {args.lora_scale:g}" if lora and args.lora_scale != 1.0 else "") + ")", file=sys.stderr)
        options = SampleOptions(steps=args.steps, cfg_scale=args.cfg, solver=args.solver, shift=args.shift,
                                sigma_schedule=args.sigma_schedule, seed=args.seed, lora_scale=args.lora_scale)
        with torch.inference_mode():
            frames = pipe.render(cond, options, progress=_progress)
        # Chunks are whole (80 frames); the video ends with the speech, as the user's audio asks.
        spoken = max(1, math.ceil(len(cond.audio.waveform) / SAMPLE_RATE * MODEL_FPS))
        if frames.shape[0] > spoken:
            print(f"trimming the last chunk to the audio: {spoken} of {frames.shape[0]} frames", file=sys.stderr)
            frames = frames[:spoken]
        # And the audio ends with the video when --max-chunks rendered less than the speech.
        audio = cond.audio.waveform[: round(frames.shape[0] / MODEL_FPS * SAMPLE_RATE)]
        out = write_sample_mp4(args.out, frames.numpy(), audio)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({frames.shape[0]} frames, {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
