"""Time one LoRA training step of the full 14B S2V transformer with random bf16 weights (GPU machine).

LoRA rank 16 on the 368 attention Linears (self-attn, text cross-attn, 12 audio injectors), base frozen,
per-block activation checkpointing, AdamW on the LoRA weights. Prints s/step (median of N after W warm-ups),
peak allocated/reserved memory, tokens, and FLOPs utilisation against the H100's dense bf16 peak.

    python bench/model_step.py --mode first          # 832x480, 81 frames + 1 reference latent: 34,320 tokens
    python bench/model_step.py --mode continuation   # + 19 framepack motion latents: 36,634 tokens
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.flops import H100_BF16_DENSE_TFLOPS, step_flops  # noqa: E402
from bench.report import check_host_budget, emit_result, peak_host_rss_gib  # noqa: E402
from engine.models.attention import (  # noqa: E402
    attach_fp8_ratios, resolve_attention_backend, set_attention_backend)
from engine.models.s2v_transformer import S2VTransformer3DModel  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def random_14b(device, dtype=torch.bfloat16, seed=0):
    with torch.device("meta"):
        model = S2VTransformer3DModel()
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
    model.requires_grad_(False)
    return model


def add_lora(model, rank: int):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True))
    # The fp32 LoRA weights run under the bf16 autocast: no fp32 copy of each LoRA input is made or saved.
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    params = [p for p in model.parameters() if p.requires_grad]
    return params


def inputs(mode: str, device, frames: int, width: int, height: int, seed: int = 1):
    g = torch.Generator(device=device).manual_seed(seed)
    t = 1 + (frames - 1) // 4
    h, w = height // 8, width // 8

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    batch = dict(
        hidden_states=rnd(1, 16, t, h, w),
        timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=rnd(1, 512, 4096),
        ref_latents=rnd(1, 16, 1, h, w),
        audio_features=rnd(1, 25, 1024, 4 * t),
    )
    if mode == "continuation":
        batch["motion_latents"] = rnd(1, 16, 19, h, w)
    else:
        batch["drop_motion_frames"] = True
    return batch, rnd(1, 16, t, h, w)


def train_step(model, batch, target, opt) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = model(**batch)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


# GPU kernels by family, first match wins (kernel names of cuDNN/FlashAttention, cuBLAS/CUTLASS, inductor).
KERNEL_FAMILIES = (
    ("attention", ("fmha", "flash", "attention", "sdpa", "cudnn")),
    ("gemm_fp8", ("e4m3", "f8", "fp8")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90")),
    ("fused_elementwise", ("triton",)),
    ("copy", ("memcpy", "memset", "copy")),
)


def profile_step(step) -> dict:
    """GPU time per kernel family over one step (torch.profiler), in seconds and as shares of the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0)
        if us <= 0 or evt.key.startswith("ProfilerStep"):
            continue
        name = evt.key.lower()
        family = next((f for f, keys in KERNEL_FAMILIES if any(k in name for k in keys)), "other")
        totals[family] = totals.get(family, 0.0) + us
        top.append((us, evt.key[:90]))
    # Operator rows (aten::...) also carry device time; keep kernels only to avoid counting twice.
    total = sum(totals.values())
    return {"gpu_s": round(total / 1e6, 3),
            "families_s": {k: round(v / 1e6, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "shares": {k: round(v / total, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "top_kernels": [[round(us / 1e6, 3), name] for us, name in sorted(top, reverse=True)[:12]]}


COMPARED_BLOCKS = (0, 9, 19, 29, 39)  # block outputs kept for the fp8 comparison (350 MB each at 34k tokens)


def _forward_with_block_outputs(model, batch) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    outs: dict[int, torch.Tensor] = {}
    hooks = []
    for i in COMPARED_BLOCKS:
        if i < len(model.blocks):
            def keep(_m, _a, out, i=i):
                outs[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            hooks.append(model.blocks[i].register_forward_hook(keep))
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(**batch).float()
    finally:
        for h in hooks:
            h.remove()
    return pred, outs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a.float() - b.float()).norm() / a.float().norm()), 5)


def _lora_grads(model, batch, target, params) -> tuple[float, torch.Tensor]:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = model(**batch)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in params])
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def quantize_and_compare(model, batch, device, kind: str, target=None, params=None, **options) -> dict:
    """Quantise the frozen base to `kind` (fp8 / int8) and return the relative L2 error of the model output and of
    some block outputs against the bf16 model, on the bench's inputs (one no-grad forward each); with `target` and
    `params`, also of the loss and of the LoRA gradients of one training step (uncompiled)."""
    from engine.models.low_bit_linear import quantize_base_linears

    ref_pred, ref_blocks = _forward_with_block_outputs(model, batch)
    ref_grad = _lora_grads(model, batch, target, params) if params else None
    count = quantize_base_linears(model, device=device, kind=kind, **options)
    torch.cuda.empty_cache()
    pred, blocks = _forward_with_block_outputs(model, batch)
    out = {"linears": count, "output": _rel(ref_pred, pred),
           "blocks": {str(i): _rel(ref_blocks[i], blocks[i]) for i in ref_blocks}}
    if ref_grad:
        loss, grads = _lora_grads(model, batch, target, params)
        out.update(loss_bf16=ref_grad[0], loss_low_bit=loss, lora_grads=_rel(ref_grad[1], grads),
                   lora_grads_cosine=round(float(torch.nn.functional.cosine_similarity(ref_grad[1], grads, dim=0)), 5))
    return out


def attention_compare(model, batch, target, params, name: str, baseline: str) -> dict:
    """The relative L2 error of the model output, some block outputs, the loss and the LoRA gradients of one
    (uncompiled) step with attention backend `name` against `baseline`, on the bench's inputs. The fp8 backend's
    first backward measures its scales first (engine/models/attention_fp8.py), so this is a calibrated step."""
    ref_pred, ref_blocks = _forward_with_block_outputs(model, batch)
    ref_loss, ref_grads = _lora_grads(model, batch, target, params)
    set_attention_backend(name)
    try:
        pred, blocks = _forward_with_block_outputs(model, batch)
        loss, grads = _lora_grads(model, batch, target, params)
    finally:
        set_attention_backend(baseline)
    return {"backend": name, "baseline": baseline, "output": _rel(ref_pred, pred),
            "blocks": {str(i): _rel(ref_blocks[i], blocks[i]) for i in ref_blocks},
            "loss_baseline": ref_loss, "loss": loss, "lora_grads": _rel(ref_grads, grads),
            "lora_grads_cosine": round(float(torch.nn.functional.cosine_similarity(ref_grads, grads, dim=0)), 5)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("first", "continuation"), default="first")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--residual", choices=("fp32", "bf16"), default="bf16",
                    help="dtype of the residual stream between blocks (fp32 = the official model)")
    ap.add_argument("--ffn-chunk", type=int, default=0, help="FFN sequence chunk in tokens (0: off)")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of blocks and injectors")
    ap.add_argument("--offload-inputs", action="store_true", help="keep checkpointed block inputs in pinned host RAM")
    ap.add_argument("--gpu-saved-inputs", type=int, default=0, metavar="N",
                    help="with --offload-inputs: keep the last N blocks' inputs on the GPU (memory.gpu_saved_inputs)")
    ap.add_argument("--policy", choices=("full", "save_attention"), default="full",
                    help="checkpointing policy: recompute whole blocks, or keep the self-attention outputs")
    ap.add_argument("--stream-blocks", type=int, default=-1, metavar="RESIDENT",
                    help="stream block weights from pinned host RAM, keeping RESIDENT blocks on the GPU (-1: off)")
    ap.add_argument("--vram-cap-gib", type=float, default=0,
                    help="emulate a smaller card: cap this process's GPU memory (set_per_process_memory_fraction)")
    ap.add_argument("--host-budget-gib", type=float, default=0,
                    help="emulate the host too: fail (exit 2) when the peak host RSS exceeds this")
    ap.add_argument("--base-weights", choices=("bf16", "fp8", "int8"), default="bf16",
                    help="fp8 / int8: the frozen self-attention, cross-attention and FFN Linears in e4m3 / int8 "
                         "(engine.models.low_bit_linear); also reports the relative error of block outputs against bf16")
    ap.add_argument("--fp8-backward", action="store_true",
                    help="with --base-weights fp8: the input-gradient matmuls in fp8 too (memory.fp8_input_grad)")
    ap.add_argument("--exact-accum", action="store_true",
                    help="with --base-weights fp8: no fast-accumulate mode (the engine uses it)")
    ap.add_argument("--grad-error", action="store_true",
                    help="with --base-weights: also compare the loss and LoRA gradients of one step against bf16")
    ap.add_argument("--attention-error", metavar="BACKEND",
                    help="before the timed steps, compare the output and LoRA gradients of one step with this "
                         "attention backend against --attention's (e.g. cudnn_fp8 against cudnn)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, profile one more step and report GPU time per kernel family")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args(argv)

    device = torch.device("cuda")
    args.attention = resolve_attention_backend(args.attention, device)[0]  # "fastest": fa4 where it runs
    set_attention_backend(args.attention)
    t0 = time.perf_counter()
    model = random_14b(device)
    model.residual_fp32 = args.residual == "fp32"
    if args.ffn_chunk:
        model.set_ffn_chunk_size(args.ffn_chunk)
    if not args.no_checkpointing:
        model.enable_gradient_checkpointing(offload_inputs=args.offload_inputs, policy=args.policy,
                                            gpu_saved_inputs=args.gpu_saved_inputs if args.offload_inputs else 0)
    model.train()
    params = add_lora(model, args.rank)
    attach_fp8_ratios(model, device)  # the cudnn_fp8 backend's per-layer scales (unused by the others)
    batch, target = inputs(args.mode, device, args.frames, args.width, args.height)
    attention_error = None
    if args.attention_error:
        attention_error = attention_compare(model, batch, target, params, args.attention_error, args.attention)
        torch.cuda.empty_cache()
    low_bit_error = None
    if args.base_weights != "bf16":
        options = dict(fp8_backward=args.fp8_backward, fast_accum=not args.exact_accum) if args.base_weights == "fp8" else {}
        low_bit_error = quantize_and_compare(model, batch, device, args.base_weights,
                                             target if args.grad_error else None,
                                             params if args.grad_error else None, **options)
    host_weights = 0
    if args.stream_blocks >= 0:
        host_weights = model.enable_block_streaming(resident=args.stream_blocks)
        torch.cuda.empty_cache()
    if args.vram_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.vram_cap_gib * 2**30 / total, torch.cuda.current_device())
    if args.compile:
        model.compile_blocks()
    opt = torch.optim.AdamW(params, lr=1e-5)
    build_s = time.perf_counter() - t0

    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = train_step(model, batch, target, opt)
        torch.cuda.synchronize()
        losses.append(round(float(loss.detach()), 6))
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    profile = None
    if args.profile:
        try:
            profile = profile_step(lambda: train_step(model, batch, target, opt))
        except Exception as exc:  # the timings above stand without it
            profile = {"error": repr(exc)[:300]}

    cfg = model.config
    t_lat = 1 + (args.frames - 1) // 4
    hw = (args.height // 16) * (args.width // 16)
    video = t_lat * hw
    motion = (hw + (args.height // 32) * (args.width // 32) + 4 * (args.height // 64) * (args.width // 64)
              if args.mode == "continuation" else 0)
    seq = video + hw + motion
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    fl = step_flops(dim, cfg.ffn_dim, cfg.num_layers, len(cfg.audio_inject_layers), seq, video,
                    recompute=not args.no_checkpointing)
    med = statistics.median(times)
    result = {
        "mode": args.mode, "tokens": seq, "frames": args.frames, "size": f"{args.width}x{args.height}",
        "attention": args.attention, "residual": args.residual, "ffn_chunk": args.ffn_chunk,
        "checkpointing": not args.no_checkpointing, "compile": args.compile, "offload_inputs": args.offload_inputs, "gpu_saved_inputs": args.gpu_saved_inputs, "policy": args.policy, "lora_params": sum(p.numel() for p in params),
        "s_per_step": round(med, 3), "s_all": [round(t, 3) for t in times],
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "stream_blocks": args.stream_blocks, "vram_cap_gib": args.vram_cap_gib,
        "host_pinned_weights_gib": round(host_weights / 2**30, 2),
        "peak_host_rss_gib": peak_host_rss_gib(),
        "model_tflops_per_s": round(fl["model"] / med / 1e12, 1),
        "mfu": round(fl["model"] / med / 1e12 / H100_BF16_DENSE_TFLOPS, 3),
        "hfu": round(fl["hardware"] / med / 1e12 / H100_BF16_DENSE_TFLOPS, 3),
        "losses": losses, "build_s": round(build_s, 1),
        "base_weights": args.base_weights, "fp8_backward": args.fp8_backward, "fast_accum": args.base_weights == "fp8" and not args.exact_accum, "low_bit_rel_error": low_bit_error, "attention_rel_error": attention_error, "profile": profile,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }
    if "cudnn_fp8" in (args.attention, args.attention_error):
        from engine.models.attention_fp8 import kernel_layout

        ratios = torch.stack([m.fp8_ratios for m in model.modules() if getattr(m, "fp8_ratios", None) is not None])
        used = ratios[(ratios > 0).all(dim=1)]
        result["fp8_layout"] = vars(kernel_layout()) if kernel_layout() else None
        result["fp8_ratios_min_max"] = [[round(float(x), 4) for x in used.min(0).values],
                                        [round(float(x), 4) for x in used.max(0).values]] if len(used) else None
    within = check_host_budget(result, args.host_budget_gib)
    emit_result(result, args.json)
    return 0 if within else 2


if __name__ == "__main__":
    sys.exit(main())
