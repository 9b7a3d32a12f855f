"""Scaled dot-product attention with a selectable backend.

Training (memory.attention_backend): `auto` lets PyTorch choose; `cudnn`, `flash`, `efficient` and `math` pin one
SDPA kernel (cuDNN is the fastest SDPA kernel measured on H100 and H200 at S2V sequence lengths, BENCHMARKS.md);
`fa4` is FlashAttention 4 (the flash-attn-4 package: CuTe DSL kernels for Hopper and Blackwell), forward and
backward; `cudnn_fp8` is cuDNN's fp8 SDPA for self-attention (engine/models/attention_fp8.py: e4m3 with per-tensor
scales, not exact; cross-attention stays on cuDNN bf16), forward and backward. Sampling only
(validation.attention_backend, `s2v-tui sample --attention`): `sage`, SageAttention 1 (int8 Q.K, fp16 P.V), which
has no backward pass. `flash_attn` (the FlashAttention 2 package) stays for the benches.

`fastest` (memory.attention_backend, `s2v-tui sample --attention`) is not a kernel but a choice made once per run
by `resolve_attention_backend`: fa4 where its probe passes on this GPU for this dtype (the fastest exact kernel
measured, BENCHMARKS.md), else cudnn (auto off CUDA or before Ampere); the run reports which and why.

Whether a backend can run on a device is answered by `attention_backend_problem`, which runs a small attention
through it and compares it with PyTorch's math kernel (as the fp8 matmul probe does): the check phase asks it
before a weight is loaded. An unavailable choice is an error, never a silent fallback.

FA4 is wrapped as two torch.library custom ops (forward returning the output and the log-sum-exp, and backward)
with fake kernels: torch.compile sees one opaque node with no graph break, and the selective checkpoint
(checkpoint_policy = "save_attention") keeps its outputs as it keeps SDPA's (`SELF_ATTENTION_KERNELS`).
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_SDPA_BACKENDS = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
BACKENDS = ("auto", *_SDPA_BACKENDS, "fa4", "cudnn_fp8", "flash_attn", "sage")
FORWARD_ONLY = ("sage",)  # no backward pass: samples only
PROBED = ("fa4", "cudnn_fp8", "sage", "flash_attn")  # packages of their own: tried on the device before a run uses them
_PACKAGES = {"fa4": "flash_attn", "cudnn_fp8": "cudnn", "flash_attn": "flash_attn", "sage": "sageattention"}
_INSTALL = {"fa4": "pip install --pre flash-attn-4, which brings nvidia-cutlass-dsl",
            "cudnn_fp8": "pip install nvidia-cudnn-frontend",
            "flash_attn": "pip install flash-attn", "sage": "pip install sageattention==1.0.6"}

_state = {"backend": "auto"}


def set_attention_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    package = _PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(
            f"attention backend {name!r} needs the {package!r} package, which is not installed "
            f"({_INSTALL[name]}); or pick 'auto' / 'cudnn' / 'flash'"
        )
    _state["backend"] = name


def resolve_attention_backend(name: str, device, dtype: str = "bf16") -> tuple[str, str | None]:
    """The backend that `name` means on `device` for a model in `dtype`, and for "fastest" why it is that one
    (None for any other name, which means itself)."""
    if name != "fastest":
        return name, None
    device = torch.device(device)
    if dtype == "fp32":
        problem = "fa4 takes bf16 or fp16 tensors and model.dtype is fp32"
    else:
        problem = attention_backend_problem("fa4", device)
    if problem is None:
        return "fa4", "FlashAttention 4 runs on this GPU"
    fallback = "cudnn" if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0) else "auto"
    return fallback, f"{problem}; {fallback} instead"


def get_attention_backend() -> str:
    return _state["backend"]


@contextmanager
def sampling_attention(name: str):
    """The attention backend of samples (validation.attention_backend): "same" keeps the training backend; any
    other is set for the block and the training backend put back after, also when sampling fails."""
    previous = _state["backend"]
    if name != "same":
        set_attention_backend(name)
    try:
        yield
    finally:
        _state["backend"] = previous


# ---- FlashAttention 4 as custom ops -----------------------------------------------------------------------------
# flash_attn.cute.flash_attn_func is a torch.autograd.Function around Python that compiles CuTe kernels on first
# use, which dynamo cannot trace; the two ops below call the same forward and backward functions it calls, with
# the same arguments (non-causal, default scale 1/sqrt(d), no softcap), on contiguous [B, S, H, D] tensors.

@torch.library.custom_op("s2v::fa4_forward", mutates_args=(), device_types="cuda")
def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, softmax_scale=None, causal=False, softcap=0.0, return_lse=True)
    return out, lse


@fa4_forward.register_fake
def _fa4_forward_fake(q, k, v):
    b, s, h, _ = q.shape
    return q.new_empty((b, s, h, v.shape[-1])), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("s2v::fa4_backward", mutates_args=(), device_types="cuda")
def fa4_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0)
    return dq, dk, dv


@fa4_backward.register_fake
def _fa4_backward_fake(dout, q, k, v, out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_inputs_and_outputs(ctx, inputs, output):  # the setup_context of both custom-op pairs (FA4, cuDNN fp8)
    ctx.save_for_backward(*inputs, *output)


def _fa4_grad(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors  # the log-sum-exp is never used downstream: its gradient is dropped
    return fa4_backward(dout.contiguous(), q, k, v, out, lse)


fa4_forward.register_autograd(_fa4_grad, setup_context=_save_inputs_and_outputs)

# ---- cuDNN fp8 self-attention as custom ops -----------------------------------------------------------------------
# As for FA4: one opaque node for torch.compile. `ratios` is the layer's delayed-scaling state (amax of dS, dQ, dK,
# dV over amax of dO, engine/models/attention_fp8.py): read by the backward, which writes this call's values back.

@torch.library.custom_op("s2v::fp8_attention_forward", mutates_args=())
def fp8_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          ratios: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.models import attention_fp8

    return attention_fp8.forward(q, k, v)


@fp8_attention_forward.register_fake
def _fp8_forward_fake(q, k, v, ratios):
    b, s, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, s, 1), dtype=torch.float32)


@torch.library.custom_op("s2v::fp8_attention_backward", mutates_args=("ratios",))
def fp8_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, stats: torch.Tensor,
                           ratios: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from engine.models import attention_fp8

    return attention_fp8.backward(dout, q, k, v, out, stats, ratios)


@fp8_attention_backward.register_fake
def _fp8_backward_fake(dout, q, k, v, out, stats, ratios):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fp8_grad(ctx, dout, _dstats):
    q, k, v, ratios, out, stats = ctx.saved_tensors
    return (*fp8_attention_backward(dout.contiguous(), q, k, v, out, stats, ratios), None)


fp8_attention_forward.register_autograd(_fp8_grad, setup_context=_save_inputs_and_outputs)


def attach_fp8_ratios(model: torch.nn.Module, device) -> None:
    """Give every attention module of `model` its fp8 delayed-scaling state on the compute device (zeros: not yet
    measured). Self-attention uses it under attention backend cudnn_fp8."""
    for module in model.modules():
        if hasattr(type(module), "fp8_ratios"):
            module.fp8_ratios = torch.zeros(4, device=device, dtype=torch.float32)


def _cudnn_fp8(q, k, v, ratios):
    if q.dtype != torch.bfloat16 or not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention backend 'cudnn_fp8' takes bf16 tensors, got {q.dtype}, {k.dtype}, {v.dtype}: "
                        "set model.dtype = \"bf16\" or memory.attention_backend = \"cudnn\"")
    if ratios is None:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError("attention backend 'cudnn_fp8' trains with per-layer scales that the engine attaches "
                               "(engine.models.attention.attach_fp8_ratios); this model has none")
        ratios = torch.zeros(4, device=q.device)  # a forward alone reads no scale of the backward
    out, _stats = fp8_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), ratios)
    return out


# Kernels whose outputs the save_attention checkpoint policy keeps, with the index of the sequence dimension of
# their query and key arguments (self-attention: equal lengths).
SELF_ATTENTION_KERNELS = {
    torch.ops.aten._scaled_dot_product_cudnn_attention.default: -2,
    torch.ops.aten._scaled_dot_product_flash_attention.default: -2,
    torch.ops.aten._scaled_dot_product_efficient_attention.default: -2,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: -2,
    torch.ops.s2v.fa4_forward.default: 1,
    torch.ops.s2v.fp8_attention_forward.default: 1,
}


def is_self_attention_kernel(op, args) -> bool:
    dim = SELF_ATTENTION_KERNELS.get(op)
    return dim is not None and args[0].shape[dim] == args[1].shape[dim]


def _fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.dtype not in (torch.bfloat16, torch.float16) or not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention backend 'fa4' takes bf16 or fp16 tensors of one dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}: set model.dtype = \"bf16\" or memory.attention_backend = \"cudnn\"")
    out, _lse = fa4_forward(q.contiguous(), k.contiguous(), v.contiguous())
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, self_attention: bool = False,
              fp8_ratios: torch.Tensor | None = None) -> torch.Tensor:
    """Full bidirectional attention. q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D]. `self_attention` and
    the layer's `fp8_ratios` matter to cudnn_fp8 only, which takes self-attention and leaves the rest to cuDNN."""
    backend = _state["backend"]
    if backend == "cudnn_fp8":
        if self_attention:
            return _cudnn_fp8(q, k, v, fp8_ratios)
        backend = "cudnn"
    if backend == "fa4":
        return _fa4(q, k, v)
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    if backend == "sage":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError("attention backend 'sage' (SageAttention) has no backward pass: it renders samples "
                               "only; train with memory.attention_backend = \"cudnn\" or \"fa4\"")
        from sageattention import sageattn

        # sageattn subtracts k's mean from k in place (smooth_k): give it a copy, never the caller's tensor.
        return sageattn(q, k.clone(), v, tensor_layout="NHD", is_causal=False)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "auto" or q.device.type != "cuda":
        out = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        with sdpa_kernel(_SDPA_BACKENDS[backend]):
            out = F.scaled_dot_product_attention(qt, kt, vt)
    return out.transpose(1, 2)


# ---- the probe: can this backend run on this device? ------------------------------------------------------------
_PROBED: dict[tuple[str, str], str | None] = {}  # (backend, device) -> problem (None: it runs), once per process


def _probe_backend(name: str, device: torch.device) -> None:
    """Run a small attention through `name` on `device` (forward, and backward where it has one) and compare it
    with the math kernel in fp32; raise with what is wrong. Tests replace this function to inject failures."""
    if device.type != "cuda":
        raise RuntimeError(f"it runs on CUDA GPUs only; this run is on {device.type}")
    package = _PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise RuntimeError(f"the {package!r} package is not installed ({_INSTALL[name]})")
    major, minor = torch.cuda.get_device_capability(device)
    label = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    if name == "fa4":
        if importlib.util.find_spec("flash_attn.cute") is None:
            raise RuntimeError("the installed flash_attn has no CuTe interface (flash_attn.cute): it is "
                               f"FlashAttention 2, not 4 ({_INSTALL[name]})")
        if major not in (9, 10, 11):
            raise RuntimeError(f"FlashAttention 4 trains on Hopper (compute capability 9.0) and Blackwell (10.x) "
                               f"GPUs; this one is {label}")
    elif name == "cudnn_fp8":
        if major < 9:
            raise RuntimeError(f"cuDNN's fp8 attention runs on Hopper (compute capability 9.0) and newer GPUs; "
                               f"this one is {label}")
    elif major < 8:
        raise RuntimeError(f"it needs an Ampere or newer GPU (compute capability 8.0+); this one is {label}")
    _trial(name, device)


def _trial(name: str, device: torch.device) -> None:
    """A small attention through `name` against the math kernel in fp32 (forward, and backward where the backend
    has one); raise when a result is missing or off. (On the CPU every backend name but fa4 and sage runs SDPA, so
    the trial's own code is testable there.)"""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 128, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    backward = name not in FORWARD_ONLY
    inputs = [t.clone().requires_grad_(backward) for t in (q, k, v)]
    previous = _state["backend"]
    _state["backend"] = name
    try:
        with torch.set_grad_enabled(backward):
            ratios = torch.zeros(4, device=device)
            out = attention(*inputs, self_attention=True, fp8_ratios=ratios)
            if out.shape != q.shape:
                raise RuntimeError(f"its output has shape {tuple(out.shape)}, not {tuple(q.shape)}")
            if backward:
                out.float().square().sum().backward()
    finally:
        _state["backend"] = previous
    ref_in = [t.float().transpose(1, 2).contiguous().requires_grad_(backward) for t in (q, k, v)]
    with torch.set_grad_enabled(backward), sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(*ref_in).transpose(1, 2)
        if backward:
            ref.square().sum().backward()
    pairs = [("output", out, ref)]
    if backward:
        pairs += [(f"d{n}", t.grad, r.grad.transpose(1, 2)) for n, t, r in zip("qkv", inputs, ref_in, strict=True)]
    # int8 Q.K rounds more than bf16 does; e4m3 (3 mantissa bits) more still: 6-7% measured at the 14B shape
    tol = {"sage": 0.05, "cudnn_fp8": 0.15}.get(name, 0.02)
    for what, got, want in pairs:
        if got is None or got.shape != want.shape:
            raise RuntimeError(f"its {what} is missing or has the wrong shape")
        got, want = got.detach().float(), want.detach()
        err = float((got - want).norm() / want.norm())
        if not err < tol:
            raise RuntimeError(f"its {what} is off by {err:.3g} (relative L2) from the math kernel")


def attention_backend_problem(name: str, device) -> str | None:
    """None when attention backend `name` runs on `device`; else why not, in one phrase (the caller names the
    setting and the fix). Backends inside PyTorch (auto, cudnn, flash, efficient, math) are not probed here."""
    if name not in PROBED:
        return None
    device = torch.device(device)
    key = (name, str(device))
    if key not in _PROBED:
        try:
            _probe_backend(name, device)
            _PROBED[key] = None
        except Exception as exc:  # noqa: BLE001 - any failure of the trial (assert, import, kernel) refuses it
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            _PROBED[key] = f"attention backend {name!r} cannot run here: {reason}"
    return _PROBED[key]
