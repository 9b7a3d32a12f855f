"""Scaled dot-product attention with a selectable backend.

`auto` lets PyTorch choose; `cudnn`, `flash`, `efficient` and `math` pin one SDPA backend (cuDNN is the fastest
measured on H100 at S2V sequence lengths, see BENCHMARKS.md); `flash_attn` and `sage` use those packages and are
accepted only when they are installed. An unavailable choice is an error, never a silent fallback.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_SDPA_BACKENDS = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
BACKENDS = ("auto", *_SDPA_BACKENDS, "flash_attn", "sage")

_state = {"backend": "auto"}


def set_attention_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    package = {"flash_attn": "flash_attn", "sage": "sageattention"}.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(
            f"attention backend {name!r} needs the {package!r} package, which is not installed; "
            "install it or pick 'auto' / 'cudnn' / 'flash'"
        )
    _state["backend"] = name


def get_attention_backend() -> str:
    return _state["backend"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full bidirectional attention. q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D]."""
    backend = _state["backend"]
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    if backend == "sage":
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="NHD")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "auto" or q.device.type != "cuda":
        out = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        with sdpa_kernel(_SDPA_BACKENDS[backend]):
            out = F.scaled_dot_product_attention(qt, kt, vt)
    return out.transpose(1, 2)
