"""Low-bit frozen base Linears: fp8 (e4m3) or int8 weights, half the memory of bf16.

    replaced = quantize_base_linears(model, families=("self_attn", "cross_attn", "ffn"), device=cuda, kind="fp8")
    model = S2VTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, device=cuda,
                                                  low_bit=LowBitSpec("fp8", ("self_attn", "cross_attn", "ffn")))

The second form (what the runner does) quantises each Linear as soon as the loader has read it
(`low_bit_load_hooks`), so no device ever holds the bf16 model; a LoRA is then added to the low-bit model
(engine.models.lora.add_lora) and comes out bit for bit as when the base is quantised after the LoRA is added.

Each chosen nn.Linear of the frozen base (also the base_layer inside a peft LoRA layer; the LoRA itself stays in
its own dtype and keeps its own bf16 path) is replaced, one at a time, by

- `Fp8Linear` (memory.base_weights = "fp8"): e4m3 weights with one fp32 scale per output row (amax / 448). The
  forward quantises the input per token (amax / 448) and multiplies with `torch._scaled_mm` (row-wise scales,
  bf16 output): the H100's fp8 tensor cores for the no-grad forward and the recompute of every checkpointed
  block, two of the three large matmuls of a training step (the third, the input gradient, with
  `fp8_backward`). Both operands are rounded to 3 mantissa bits: the fastest, and the larger numerical change.
- `Int8Linear` (memory.base_weights = "int8"): weight-only int8 with one scale per output row (amax / 127);
  the forward dequantises the weight to the input's dtype and runs the ordinary bf16 matmul, so activations are
  untouched and the weight error is a third of e4m3's (relative L2 0.9% against 2.6% on a 5120x5120 Gaussian
  weight). The same memory as fp8; on the 14B model its step was 12.80 s against bf16's 13.14 s (compiled, not
  the same call) and fp8's 12.17 s, with a third of fp8's output error (BENCHMARKS.md).

For both, the input gradient is `grad @ W` with W dequantised to bf16 inside the backward (nothing of the
dequantised weight is kept between forward and backward; the base weights need no gradient). With
`fp8_backward` (memory.fp8_input_grad) the fp8 Linear computes it on the fp8 tensor cores as well: the weight's row
scales are folded into the gradient's columns, the gradient is quantised per token to e4m3 and multiplied with
the stored weight (transposed into a transient column-major copy, as the kernel wants); this rounds the
gradient that reaches every earlier LoRA weight to 3 mantissa bits. The fp8 kernels run in fast-accumulate mode
(`fast_accum`, on by default): on the 14B model it moved the output error from 4.43% to 4.44% and made the
step 1.8% faster (BENCHMARKS.md); `fast_accum=False` keeps the periodic fp32 promotion of the accumulators.
On the CPU (tests) `torch._scaled_mm` has no row-wise scales: the same fp8 quantisation is applied and the product computed in fp32
from the dequantised operands, which is what the fp8 kernel computes up to summation order.

The fp8 weight is stored as uint8 and viewed as e4m3 at use: `Module.to(dtype)` casts every floating-point
buffer, and an e4m3 buffer would silently be widened to bf16 by a later `.to(torch.bfloat16)` (int8 buffers are
left alone by it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from engine.config.schema import LOW_BIT_DEFAULT_FAMILIES, LOW_BIT_FAMILIES

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
INT8_MAX = 127.0
_TINY = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero
_QUANTIZE_CHUNK = 1 << 22  # weights quantised at a time by from_linear (16 MiB of fp32 per temporary)
KINDS = ("fp8", "int8")

# Module families of the transformer that may hold low-bit weights, by module name. The audio injectors, the
# embeddings, modulation and the output head stay bf16: they are small, and the audio path is what S2V is for.
FAMILIES = {
    "self_attn": re.compile(r"^blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)$"),
    "cross_attn": re.compile(r"^blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)$"),
    "ffn": re.compile(r"^blocks\.\d+\.ffn\.net\.(0\.proj|2)$"),
    "audio_attn": re.compile(r"^audio_injector\.injector\.\d+\.(to_q|to_k|to_v|to_out\.0)$"),
}
DEFAULT_FAMILIES = LOW_BIT_DEFAULT_FAMILIES
assert set(FAMILIES) == set(LOW_BIT_FAMILIES), "the config's family names and these patterns must agree"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, fp32 scales [rows, 1]) with x ~= q.float() * scale, one scale per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 tensor, fp32 scales [rows, 1]) with w ~= q.float() * scale, symmetric, one scale per row."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) / INT8_MAX
    return (wf / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def _rowwise_kernel_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16


def _dequantize(w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    return w_q.float() * w_scale


class _LowBitMatmul(torch.autograd.Function):
    """x2d @ W.t() + bias for a stored (w_q, w_scale); the backward returns the input gradient only, with W
    dequantised there again (nothing but the stored weight is kept for it). `opts` = (fast_accum, fp8_backward),
    used by the fp8 subclass."""

    @staticmethod
    def backward(ctx, grad):
        w_q, w_scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return _input_grad(ctx, grad, w_q, w_scale), None, None, None, None


def _input_grad(ctx, grad, w_q, w_scale):
    # A plain function rather than a call into another Function's backward: dynamo traces this one inline.
    if getattr(ctx, "fp8_backward", False):
        return fp8_input_grad(grad, w_q, w_scale, ctx.fast_accum)
    return grad @ _dequantize(w_q, w_scale).to(grad.dtype)


def fp8_input_grad(grad: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, fast_accum: bool) -> torch.Tensor:
    """grad @ (w_q * w_scale) with both operands in e4m3: (grad * w_scale.T) quantised per token, times w_q."""
    gq, g_scale = quantize_rows(grad.float() * w_scale.t())
    if _rowwise_kernel_ok(grad):
        w_cols = w_q.t().contiguous().t()  # [out, in] column-major: the layout _scaled_mm takes for its 2nd operand
        ones = torch.ones(1, w_q.shape[1], dtype=torch.float32, device=grad.device)
        return torch._scaled_mm(gq, w_cols, scale_a=g_scale, scale_b=ones, out_dtype=torch.bfloat16,
                                use_fast_accum=fast_accum)
    return ((gq.float() * g_scale) @ w_q.float()).to(grad.dtype)


class _Fp8Matmul(_LowBitMatmul):
    @staticmethod
    def forward(ctx, x2d, w_q, w_scale, bias, opts):
        ctx.fast_accum, ctx.fp8_backward = opts
        xq, x_scale = quantize_rows(x2d)
        if _rowwise_kernel_ok(x2d):
            out = torch._scaled_mm(xq, w_q.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16,
                                   use_fast_accum=ctx.fast_accum)
            if bias is not None:  # added here rather than in the kernel: inductor fuses it into the next op
                out = out + bias
        else:
            out = (xq.float() * x_scale) @ _dequantize(w_q, w_scale).t()
            if bias is not None:
                out = out + bias.float()
            out = out.to(x2d.dtype)
        ctx.save_for_backward(w_q, w_scale)
        return out


class _Int8Matmul(_LowBitMatmul):
    @staticmethod
    def forward(ctx, x2d, w_q, w_scale, bias, opts):
        out = x2d @ _dequantize(w_q, w_scale).to(x2d.dtype).t()
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.save_for_backward(w_q, w_scale)
        return out


_FP8_PROBED: dict[str, str | None] = {}  # device -> problem (None: the kernels run), probed once per process


def _gpu_label(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"


def _probe_fp8_kernels(device: torch.device) -> None:
    """One small fp8 Linear through forward and backward (fp8 input gradient) on `device`, the same path a training
    step takes; raise if a kernel fails or the forward disagrees with the emulation. (On the CPU it is the
    emulation, so the probe's own code is testable there.)"""
    g = torch.Generator(device=device).manual_seed(0)
    linear = nn.Linear(64, 48, bias=False, device=device).requires_grad_(False)
    linear.weight.normal_(generator=g)
    f8 = Fp8Linear.from_linear(linear, device)
    f8.fp8_backward = True
    x = torch.randn(32, 64, device=device, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    y = f8(x)
    y.backward(torch.ones_like(y))
    x_q, x_scale = quantize_rows(x.detach())
    expected = (x_q.float() * x_scale) @ f8.dequantized().t()
    tol = 0.02 * float(expected.abs().max())
    if x.grad is None or x.grad.shape != x.shape or not torch.allclose(y.detach().float(), expected, rtol=0.02,
                                                                       atol=tol):
        raise RuntimeError("the fp8 product disagrees with its emulation")


def fp8_kernel_problem(device) -> str | None:
    """None when this device runs the fp8 Linear (the CPU emulates it); else what is wrong and what to set.

    Tried on a small product rather than judged from the compute capability: which GPUs torch's row-wise scaled
    fp8 kernel covers has changed between releases (Hopper first; Ada and Blackwell later or not at all)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    key = str(device)
    if key not in _FP8_PROBED:
        try:
            _probe_fp8_kernels(device)
            _FP8_PROBED[key] = None
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            _FP8_PROBED[key] = (f'memory.base_weights = "fp8" needs row-wise scaled fp8 matmuls (torch._scaled_mm), '
                                f"which this GPU ({_gpu_label(device)}) does not run with torch {torch.__version__} "
                                f'({reason}): set base_weights = "int8" (the same memory, bf16 matmuls) or "bf16"')
    return _FP8_PROBED[key]


class LowBitLinear(nn.Module):
    """A frozen Linear whose weight is stored in one byte with one fp32 scale per output row; the subclasses say
    how it is stored (`STORAGE`, `quantize`, `stored_weight`) and multiplied (`MATMUL`)."""

    STORAGE: torch.dtype
    MATMUL: type[_LowBitMatmul]
    LABEL: str

    def __init__(self, in_features: int, out_features: int, has_bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fast_accum = True  # fp8 only: see the module docstring
        self.fp8_backward = False
        self.register_buffer("weight_q", torch.empty(out_features, in_features, dtype=self.STORAGE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16, device=device)
                             if has_bias else None)
        # The dtype of the Linear this one replaced: peft gives a LoRA added later the dtype of its base weight
        # (engine.models.lora.add_lora), which it would otherwise take from the bf16 Linear.
        self.source_dtype = torch.bfloat16

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def stored_weight(self) -> torch.Tensor:
        return self.weight_q

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | None = None) -> LowBitLinear:
        device = device or linear.weight.device
        weight = linear.weight.detach()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, device=device)
        # A few rows at a time: the quantisation's fp32 temporaries are three times the weight's size at most, 0.8 GB
        # for a 14B FFN Linear beside the model being loaded, and each row is quantised on its own anyway.
        rows = max(1, _QUANTIZE_CHUNK // linear.in_features)
        for start in range(0, linear.out_features, rows):
            q, scale = cls.quantize(weight[start:start + rows].to(device))
            out.weight_q[start:start + rows].copy_(q)
            out.weight_scale[start:start + rows].copy_(scale)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach().to(device, torch.bfloat16))
        out.source_dtype = linear.weight.dtype
        return out

    def dequantized(self) -> torch.Tensor:
        return _dequantize(self.stored_weight(), self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # The fp8 kernel wants a contiguous row-major input; reshape keeps a copy only where one is needed.
        x2d = x.reshape(-1, self.in_features).contiguous()
        bias = self.bias if self.bias is None or x.dtype == torch.bfloat16 else self.bias.to(x.dtype)
        out = self.MATMUL.apply(x2d, self.stored_weight(), self.weight_scale, bias,
                                (self.fast_accum, self.fp8_backward))
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.LABEL}"


class Fp8Linear(LowBitLinear):
    """e4m3 weights with row scales, fp8 matmuls in the forward (see the module docstring)."""

    STORAGE, MATMUL, LABEL = torch.uint8, _Fp8Matmul, "e4m3 row-scaled"

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = quantize_rows(weight)
        return q.view(torch.uint8), scale

    def stored_weight(self) -> torch.Tensor:
        return self.weight_q.view(E4M3)


class Int8Linear(LowBitLinear):
    """Weight-only int8 with row scales, bf16 matmuls (see the module docstring)."""

    STORAGE, MATMUL, LABEL = torch.int8, _Int8Matmul, "int8 row-scaled weight-only"

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows_int8(weight)


_MODULES = {"fp8": Fp8Linear, "int8": Int8Linear}


def family_of(name: str, families) -> str | None:
    for family in families:
        if FAMILIES[family].match(name):
            return family
    return None


@dataclass(frozen=True)
class LowBitSpec:
    """What to hold in low bit: `kind` (fp8 / int8), the module `families`, and the fp8-only options
    `fp8_backward` / `fast_accum` (module docstring). Checked when made, so a bad spec fails before any weight
    is read."""

    kind: str
    families: tuple[str, ...] = DEFAULT_FAMILIES
    fp8_backward: bool = False
    fast_accum: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in _MODULES:
            raise ValueError(f"low-bit kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.kind != "fp8" and (self.fp8_backward or self.fast_accum is not None):
            raise ValueError("fp8_backward and fast_accum apply to fp8 base weights only")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown low-bit module families {unknown}: choose from {', '.join(FAMILIES)}")
        object.__setattr__(self, "families", tuple(self.families))

    def make(self, linear: nn.Linear, device: torch.device | None = None) -> LowBitLinear:
        """The low-bit copy of `linear` on `device`, with this spec's options set."""
        low_bit = _MODULES[self.kind].from_linear(linear, device)
        if self.kind == "fp8":
            low_bit.fp8_backward = self.fp8_backward
            low_bit.fast_accum = True if self.fast_accum is None else self.fast_accum
        return low_bit


def low_bit_targets(model: nn.Module, families) -> list[str]:
    """Names of the nn.Linear modules of `families` in `model` (a peft LoRA layer's base_layer included)."""
    names = []
    for name, module in model.named_modules():
        # peft wraps a Linear as <name>.base_layer inside a LoRA layer named <name>: match the LoRA layer's name.
        target_name = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
        if isinstance(module, nn.Linear) and family_of(target_name, families) is not None:
            names.append(name)
    return names


def held_low_bit(model: nn.Module) -> dict[str, int]:
    """How many low-bit Linears `model` holds, by kind (empty: none)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        for kind, cls in _MODULES.items():
            if type(module) is cls:
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def low_bit_load_hooks(model: nn.Module, spec: LowBitSpec, device: torch.device | None = None) -> dict:
    """For engine.models.loading.load_state_into: module name -> hook that replaces that Linear by its low-bit
    copy on `device` once the loader has placed its weight and bias, so the bf16 weight is dropped at once and
    the loaded model never holds more than one of them. `model` is the meta-built model (no LoRA yet)."""
    def hook(model: nn.Module, name: str) -> None:
        model.set_submodule(name, spec.make(model.get_submodule(name), device))

    return {name: hook for name in low_bit_targets(model, spec.families)}


def quantize_base_linears(model: nn.Module, families=DEFAULT_FAMILIES, device: torch.device | None = None,
                          kind: str = "fp8", fp8_backward: bool = False, fast_accum: bool | None = None) -> int:
    """Replace the frozen Linears of `families` (peft LoRA base layers included) by Fp8Linear or Int8Linear
    (`kind`), one at a time on `device` (so the GPU never holds the bf16 and low-bit copies of more than one
    layer). `fp8_backward` / `fast_accum`: fp8 only (module docstring). Returns how many; Linears already in low
    bit are left as they are. A model can also be loaded in low bit (LowBitSpec, loading.load_transformer)."""
    spec = LowBitSpec(kind, tuple(families), fp8_backward, fast_accum)
    names = low_bit_targets(model, spec.families)
    for name in names:
        module = model.get_submodule(name)
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"{name} is trainable; low-bit storage is for the frozen base only")
        model.set_submodule(name, spec.make(module, device))
    return len(names)
