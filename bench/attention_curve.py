"""Training curves of a small S2V transformer under two attention backends, same data, seeds and steps.

What an inexact attention kernel (cudnn_fp8: e4m3 with per-tensor scales) does to training, beside the exact one:
a small model of the real class (S2VTransformer3DModel, default 4 blocks of 4 heads x 128, the 14B's head width)
with LoRA rank 16 on the attention Linears learns the flow-matching velocity of a fixed set of random latent
clips, their conditioning fixed too; every step draws its clip, noise and timestep from one seed, so both runs see
the same batches. Prints and writes one JSON line per backend: the losses, and for each backend after the first
the mean and largest relative gap of its 10-step moving average to the first backend's.

    python3 bench/attention_curve.py --backends cudnn,cudnn_fp8 --steps 300 --out $OUT/attention-curve.jsonl
    python3 bench/attention_curve.py --device cpu --heads 2 --head-dim 24 --steps 40 --out x.jsonl   # emulated fp8

On the CPU `cudnn` is PyTorch's SDPA and `cudnn_fp8` runs engine/models/attention_fp8.py's emulation of the
kernel (the test suite's check of this script); on CUDA both are the real kernels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model_step import add_lora  # noqa: E402
from engine.models import attention as attn  # noqa: E402
from engine.models.s2v_transformer import S2VTransformer3DModel  # noqa: E402
from engine.models.tiny import TINY_TRANSFORMER  # noqa: E402


def small_model(heads: int, head_dim: int, layers: int, device, seed: int = 0):
    torch.manual_seed(seed)
    cfg = dict(TINY_TRANSFORMER, num_attention_heads=heads, attention_head_dim=head_dim,
               ffn_dim=4 * heads * head_dim, num_layers=layers, audio_inject_layers=(0, layers - 1))
    model = S2VTransformer3DModel(**cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5)
    model.requires_grad_(False)
    return model.to(device=device, dtype=torch.bfloat16)


def clips(n: int, latent_t: int, size: int, model, device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)
    return [dict(x0=rnd(1, 16, latent_t, size, size), ref=rnd(1, 16, 1, size, size),
                 text=rnd(1, 16, cfg.text_dim), audio=rnd(1, cfg.num_weighted_avg_layers, cfg.audio_dim, 4 * latent_t))
            for _ in range(n)]


def train(backend: str, args, device) -> list[float]:
    model = small_model(args.heads, args.head_dim, args.layers, device)
    params = add_lora(model, 16)
    for p in params:
        p.data = p.data.float()
    attn.attach_fp8_ratios(model, device)
    attn._state["backend"] = backend  # set directly: on the CPU the fp8 backend is its emulation (no package)
    data = clips(args.clips, args.latent_frames, args.latent_size, model, device)
    opt = torch.optim.AdamW(params, lr=args.lr)
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(args.steps):
        c = data[int(torch.randint(len(data), (1,), generator=g))]
        t = float(torch.rand((), generator=g))
        noise = torch.randn(c["x0"].shape, generator=g).to(device=device, dtype=torch.bfloat16)
        xt = (1 - t) * c["x0"] + t * noise
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = model(hidden_states=xt, timestep=torch.tensor([1000.0 * t], device=device),
                         encoder_hidden_states=c["text"], ref_latents=c["ref"], audio_features=c["audio"],
                         drop_motion_frames=True)
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - c["x0"]).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 6))
    attn._state["backend"] = "auto"
    return losses


def moving_average(xs: list[float], n: int = 10) -> list[float]:
    return [sum(xs[max(0, i - n + 1):i + 1]) / len(xs[max(0, i - n + 1):i + 1]) for i in range(len(xs))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="cudnn,cudnn_fp8", help="comma-separated; the first is the reference")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--latent-frames", type=int, default=5)
    ap.add_argument("--latent-size", type=int, default=32, help="latent height = width (832x480 is 60x104)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    curves, lines = {}, []
    for name in names:
        t0 = time.perf_counter()
        curves[name] = train(name, args, device)
        line = {"kind": "curve", "backend": name, "steps": args.steps, "wall_s": round(time.perf_counter() - t0, 1),
                "first_loss": curves[name][0], "last10_mean": round(sum(curves[name][-10:]) / 10, 6),
                "losses": curves[name], "shape": {"heads": args.heads, "head_dim": args.head_dim,
                                                  "layers": args.layers, "latent_frames": args.latent_frames,
                                                  "latent_size": args.latent_size},
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        if name != names[0]:
            ref, mine = moving_average(curves[names[0]]), moving_average(curves[name])
            gaps = [abs(a - b) / b for a, b in zip(mine, ref, strict=True)]
            line.update(vs=names[0], mean_rel_gap=round(sum(gaps) / len(gaps), 5), max_rel_gap=round(max(gaps), 5))
        lines.append(line)
        print(json.dumps({k: v for k, v in line.items() if k != "losses"}), flush=True)
    with open(args.out, "a") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
