"""Analytic FLOPs of an S2V LoRA training step (spec section 11.3), for MFU figures in the benches."""
from __future__ import annotations

H100_BF16_DENSE_TFLOPS = 989.4  # vendor peak, dense bf16, H100 SXM


def step_flops(dim: int, ffn: int, layers: int, injectors: int, seq: int, video: int, text: int = 512,
               recompute: bool = True) -> dict:
    """Forward, model (fwd + input-grad bwd) and hardware (with per-block recompute) FLOPs of one sample."""
    lin = seq * (12 * dim * dim + 4 * dim * ffn) + 4 * text * dim * dim
    attn = 4 * seq * seq * dim + 4 * seq * text * dim
    inj = 4 * video * dim * dim
    fwd = layers * (lin + attn) + injectors * inj
    # Frozen base: backward through a Linear is one matmul (input grad); attention backward is ~2x forward.
    model = layers * (2 * lin + 3 * attn) + injectors * 2 * inj
    hardware = model + (fwd if recompute else 0)
    return {"forward": fwd, "model": model, "hardware": hardware}

