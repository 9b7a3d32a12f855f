"""fp8 self-attention through cuDNN's fp8 SDPA, forward and backward (memory.attention_backend = "cudnn_fp8").

In e4m3 with one scale per tensor: Q, K, V and the softmax probabilities in the forward; dO, the probabilities and
the softmax gradient dS in the backward; O, dQ, dK and dV in bf16 where the installed cuDNN builds that graph
(`kernel_layout` says which it built), else in e4m3 too. Accumulation is fp32 throughout. Cross-attention (text
and audio keys) stays on cuDNN's bf16 kernel: its keys are few, so fp8 would save nothing there.

Scales are powers of two, so scaling a bf16 tensor is exact and the only rounding is the cast to e4m3.
- Q, K, V, dO, and O where it is e4m3: from their own amax at each call (current scaling).
- The probabilities: 448, as they lie in [0, 1]. An e4m3 O is bounded by V's amax (each row of O is an average
  of V's rows), so its scale needs no measurement either.
- dS, and dQ, dK, dV where they are e4m3, exist only inside the backward kernel, so their scales come from the last
  backward of the same layer (delayed scaling), made independent of the loss's size: the backward is linear in dO,
  so each layer keeps amax(x) / amax(dO) for x in dS, dQ, dK, dV (a tensor of 4 floats on its attention module,
  `fp8_ratios`, set by attention.attach_fp8_ratios), and this call scales x for an amax of HEADROOM x ratio x amax(dO) (a factor 4 of
  headroom for the change from step to step; a value past it saturates at 448). A layer's first backward runs three times: twice to measure (dQ and dK
  come from the scaled dS), once to use. The ratios are not in a checkpoint: a resumed run measures them again at
  its first step.

`emulate_forward` / `emulate_backward` compute the same quantities as the kernel, with the same quantisation, in
fp32 on any device (the kernel's online softmax takes block-wise row maxima where these take the row's): the CPU
tests check the scales and the numerics with them, and `bench/attention_backends.py` compares the kernel with them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
HEADROOM = 4.0  # a delayed scale leaves room for this growth of the amax since the last step (2 was too little)
P_SCALE = FP8_MAX  # the probabilities lie in [0, 1]
GRADS = ("dS", "dQ", "dK", "dV")  # the order of a layer's fp8_ratios


def pow2_scale(amax: torch.Tensor, headroom: float = 1.0) -> torch.Tensor:
    """The largest power of two s with headroom * amax * s <= 448 (fp32, on amax's device; no host sync). A zero
    amax (an all-zero tensor) gets 2^100, which keeps zeros zero."""
    room = (headroom * amax.float()).clamp_min(2.0 ** -100)
    return torch.exp2(torch.floor(torch.log2(FP8_MAX / room)))


def quantize(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (bf16/fp16/fp32) -> (e4m3 tensor of x's layout, descale = 1/scale, amax), scale from x's own amax unless
    given."""
    amax = torch.linalg.vector_norm(x, float("inf")).float()  # max |x|, exact in x's dtype, no |x| temporary
    if scale is None:
        scale = pow2_scale(amax)
    return (x * scale.to(x.dtype)).to(FP8), 1.0 / scale, amax


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Cast to e4m3, saturating at +-448 (as cuDNN's conversions do) rather than making NaN (as torch's does)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    return t.float().transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D]


def emulate_forward(q8, k8, v8, descales, o_fp8: bool = False):
    """What the fp8 forward kernel computes from e4m3 Q/K/V [B, S, H, D] and their descales (3 fp32 scalars):
    (O fp32 [B, S, H, D], log-sum-exp [B, H, S, 1]); O rounded through e4m3 as the kernel's e4m3 O is, if asked."""
    dq, dk, dv = descales
    scale = 1.0 / math.sqrt(q8.shape[-1])
    s = (_bhsd(q8) @ _bhsd(k8).transpose(-1, -2)) * (dq * dk * scale)
    row_max = s.amax(-1, keepdim=True)
    e = torch.exp(s - row_max)  # in (0, 1]: what the kernel puts through e4m3 before the P.V product
    total = e.sum(-1, keepdim=True)
    e8 = to_fp8(e * P_SCALE).float()
    o = (e8 @ _bhsd(v8)) * (dv / P_SCALE) / total
    stats = row_max + torch.log(total)
    if o_fp8:
        o8, descale_o, _ = quantize(o, pow2_scale(dv * FP8_MAX, 1.25))
        o = o8.float() * descale_o
    return o.transpose(1, 2), stats


def emulate_backward(do8, q8, k8, v8, out, stats, descales, grad_scales):
    """What the fp8 backward kernel computes: descales of dO, Q, K, V (4 fp32 scalars); grad_scales the scales of
    dS, dQ, dK, dV (None: kept in fp32, as a bf16 output nearly is). Returns (dQ, dK, dV fp32 [B, S, H, D], amax of
    dS, dQ, dK, dV, each before its scale)."""
    ddo, dq_, dk_, dv_ = descales
    scale = 1.0 / math.sqrt(q8.shape[-1])
    q, k, v, do = _bhsd(q8), _bhsd(k8), _bhsd(v8), _bhsd(do8)
    p = torch.exp((q @ k.transpose(-1, -2)) * (dq_ * dk_ * scale) - stats)  # normalised probabilities
    p8 = to_fp8(p * P_SCALE).float()
    dv = (p8.transpose(-1, -2) @ do) * (ddo / P_SCALE)
    dp = (do @ v.transpose(-1, -2)) * (ddo * dv_)
    delta = (do * ddo * _bhsd(out)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    amax = [ds.abs().amax()]
    s_ds = grad_scales[0] if grad_scales is not None else pow2_scale(amax[0])
    ds8 = to_fp8(ds * s_ds).float()
    dq = (ds8 @ k) * (dk_ * scale / s_ds)
    dk = (ds8.transpose(-1, -2) @ q) * (dq_ * scale / s_ds)
    grads = []
    for i, g in enumerate((dq, dk, dv), start=1):
        amax.append(g.abs().amax())
        if grad_scales is not None and grad_scales[i] is not None:
            g = to_fp8(g * grad_scales[i]).float() / grad_scales[i]
        grads.append(g.transpose(1, 2))
    return (*grads, torch.stack(amax))


# ---- the cuDNN graphs -------------------------------------------------------------------------------------------

def build_plans(cudnn, graph) -> int:
    """Validate a cuDNN frontend graph and build its execution plans (heuristics A, then the fallback); raises when
    no engine supports it. Returns the workspace size in bytes."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph.get_workspace_size()


@dataclass(frozen=True)
class KernelLayout:
    o_dtype: str  # "bf16" or "fp8": the dtype of O written by the forward and read by the backward
    grad_dtype: str  # of dQ, dK, dV written by the backward


# Tried in order at the first call of a shape; the first the installed cuDNN builds is used (and reported).
LAYOUTS = (KernelLayout("bf16", "bf16"), KernelLayout("bf16", "fp8"), KernelLayout("fp8", "fp8"))
_GRAPHS: dict[tuple, "_CudnnGraphs"] = {}


def kernel_layout() -> KernelLayout | None:
    """The layout of the graphs built so far in this process (None before the first GPU call)."""
    return next((g.layout for g in _GRAPHS.values()), None)


class _CudnnGraphs:
    """cuDNN fp8 SDPA forward and backward graphs for one shape [B, S, H, D] (BSHD strides, as the model makes
    them: no transpose), non-causal, scale 1/sqrt(D), with every scale a device tensor (no host sync)."""

    def __init__(self, b, s, h, d, device):
        import cudnn

        self.cudnn, self.device, self.dims = cudnn, device, (b, h, s, d)
        self.strides = (s * h * d, d, h * d, 1)
        self.handle = cudnn.create_handle()
        self.attn_scale = 1.0 / math.sqrt(d)
        # the probabilities' fixed scale, made once: a torch.tensor(...) per call would copy from the host each time
        self.p_scale = torch.full((1, 1, 1, 1), P_SCALE, device=device)
        self.p_descale = torch.full((1, 1, 1, 1), 1.0 / P_SCALE, device=device)
        errors = []
        for layout in LAYOUTS:
            try:
                self._build_forward(layout)
                self._build_backward(layout)
                self.layout = layout
                return
            except Exception as exc:  # noqa: BLE001 - an unsupported graph: try the next layout
                errors.append(f"O {layout.o_dtype}, dQ/dK/dV {layout.grad_dtype}: {str(exc).strip()[:200]}")
        raise RuntimeError("cuDNN builds no fp8 attention graph for shape "
                           f"{(b, s, h, d)}: " + "; ".join(errors))

    def _type(self, name):
        t = self.cudnn.data_type
        return {"fp8": t.FP8_E4M3, "bf16": t.BFLOAT16, "f32": t.FLOAT}[name]

    def _graph(self):
        return self.cudnn.pygraph(io_data_type=self._type("fp8"), intermediate_data_type=self._type("f32"),
                                  compute_data_type=self._type("f32"), handle=self.handle)

    def _tensor(self, g, dtype="fp8"):
        return g.tensor(dim=self.dims, stride=self.strides, data_type=self._type(dtype))

    def _scalar(self, g):
        return g.tensor(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=self._type("f32"))

    def _stats(self, g):
        b, h, s, _ = self.dims
        return g.tensor(dim=(b, h, s, 1), stride=(h * s, s, 1, 1), data_type=self._type("f32"))

    def _output(self, t, dims, strides, dtype):
        t.set_output(True).set_dim(dims).set_stride(strides).set_data_type(self._type(dtype))

    def _finish(self, g):
        return build_plans(self.cudnn, g)

    def _build_forward(self, layout):
        g = self._graph()
        b, h, s, _ = self.dims
        self.f_in = {n: self._tensor(g) for n in ("q", "k", "v")}
        self.f_sc = {n: self._scalar(g) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s",
                                                  "scale_o")}
        o, stats, _amax_s, amax_o = g.sdpa_fp8(q=self.f_in["q"], k=self.f_in["k"], v=self.f_in["v"],
                                               generate_stats=True, attn_scale=self.attn_scale, **self.f_sc)
        self._output(o, self.dims, self.strides, layout.o_dtype)
        self._output(stats, (b, h, s, 1), (h * s, s, 1, 1), "f32")
        self._output(amax_o, (1, 1, 1, 1), (1, 1, 1, 1), "f32")
        self.f_out = {"o": o, "stats": stats, "amax_o": amax_o}
        self.f_graph, self.f_ws = g, self._finish(g)

    def _build_backward(self, layout):
        g = self._graph()
        self.b_in = {n: self._tensor(g) for n in ("q", "k", "v", "dO")}
        self.b_in["o"] = self._tensor(g, layout.o_dtype)
        self.b_in["stats"] = self._stats(g)
        names = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
                 "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")
        self.b_sc = {n: self._scalar(g) for n in names}
        outs = g.sdpa_fp8_backward(attn_scale=self.attn_scale, **self.b_in, **self.b_sc)
        self.b_out = dict(zip(("dQ", "dK", "dV", "amax_dQ", "amax_dK", "amax_dV", "amax_dP"), outs, strict=True))
        for n in ("dQ", "dK", "dV"):
            self._output(self.b_out[n], self.dims, self.strides, layout.grad_dtype)
        for n in ("amax_dQ", "amax_dK", "amax_dV", "amax_dP"):
            self._output(self.b_out[n], (1, 1, 1, 1), (1, 1, 1, 1), "f32")
        self.b_graph, self.b_ws = g, self._finish(g)

    def _execute(self, graph, workspace_size, pack):
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(self.device).cuda_stream)
        workspace = torch.empty(workspace_size, device=self.device, dtype=torch.uint8)
        graph.execute(pack, workspace, handle=self.handle)

    @staticmethod
    def _s(x) -> torch.Tensor:
        return x.reshape(1, 1, 1, 1).float().contiguous()

    def _new(self, dtype):
        b, h, s, d = self.dims
        return torch.empty((b, s, h, d), device=self.device, dtype=dtype)

    def forward(self, q8, k8, v8, descales, scale_o):
        o = self._new(torch.bfloat16 if self.layout.o_dtype == "bf16" else FP8)
        b, h, s, _ = self.dims
        stats = torch.empty((b, h, s, 1), device=self.device, dtype=torch.float32)
        amax_o = torch.empty((1, 1, 1, 1), device=self.device, dtype=torch.float32)
        values = {"descale_q": descales[0], "descale_k": descales[1], "descale_v": descales[2],
                  "descale_s": self.p_descale, "scale_s": self.p_scale, "scale_o": scale_o}
        pack = {self.f_in["q"]: q8, self.f_in["k"]: k8, self.f_in["v"]: v8, self.f_out["o"]: o,
                self.f_out["stats"]: stats, self.f_out["amax_o"]: amax_o}
        pack.update({self.f_sc[n]: self._s(t) for n, t in values.items()})
        self._execute(self.f_graph, self.f_ws, pack)
        return o, stats

    def backward(self, q8, k8, v8, o_in, do8, stats, descales, descale_o, grad_scales):
        """descales of dO, Q, K, V; grad_scales of dS, dQ, dK, dV. Returns (dQ, dK, dV, amax [4] of dS..dV)."""
        grad_dtype = torch.bfloat16 if self.layout.grad_dtype == "bf16" else FP8
        grads = {n: self._new(grad_dtype) for n in ("dQ", "dK", "dV")}
        amax = torch.empty(4, device=self.device, dtype=torch.float32)
        amaxes = {n: amax[i:i + 1].view(1, 1, 1, 1) for i, n in enumerate(("amax_dP", "amax_dQ", "amax_dK",
                                                                            "amax_dV"))}
        values = {"descale_dO": descales[0], "descale_q": descales[1], "descale_k": descales[2],
                  "descale_v": descales[3], "descale_o": descale_o,
                  "descale_s": self.p_descale, "scale_s": self.p_scale,
                  "scale_dP": grad_scales[0], "descale_dP": 1.0 / grad_scales[0],
                  "scale_dQ": grad_scales[1], "scale_dK": grad_scales[2], "scale_dV": grad_scales[3]}
        pack = {self.b_in["q"]: q8, self.b_in["k"]: k8, self.b_in["v"]: v8, self.b_in["o"]: o_in,
                self.b_in["dO"]: do8, self.b_in["stats"]: stats,
                **{self.b_out[n]: t for n, t in grads.items()}, **{self.b_out[n]: t for n, t in amaxes.items()}}
        pack.update({self.b_sc[n]: self._s(t) for n, t in values.items()})
        self._execute(self.b_graph, self.b_ws, pack)
        return grads["dQ"], grads["dK"], grads["dV"], amax


def _graphs(q: torch.Tensor) -> _CudnnGraphs:
    b, s, h, d = q.shape
    key = (b, s, h, d, str(q.device))
    if key not in _GRAPHS:
        _GRAPHS[key] = _CudnnGraphs(b, s, h, d, q.device)
    return _GRAPHS[key]


# ---- one call: forward and backward on any device ----------------------------------------------------------------

def _o_scale(v_descale: torch.Tensor) -> torch.Tensor:
    # |O| <= amax(V) = 448 * v_descale at most (rows of O are averages of V's rows); 1.25 covers P's rounding
    return pow2_scale(v_descale * FP8_MAX, 1.25)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 q, k, v [B, S, H, D] -> (O in q's dtype [B, S, H, D], log-sum-exp fp32 [B, H, S, 1])."""
    (q8, dq, _), (k8, dk, _), (v8, dv, _) = (quantize(t) for t in (q, k, v))
    if q.device.type != "cuda":
        o, stats = emulate_forward(q8, k8, v8, (dq, dk, dv))
        return o.to(q.dtype).contiguous(), stats  # [B, S, H, D] contiguous, as the kernel writes it
    graphs = _graphs(q)
    o_fp8 = graphs.layout.o_dtype == "fp8"
    scale_o = _o_scale(dv) if o_fp8 else torch.ones((), device=q.device)
    o, stats = graphs.forward(q8, k8, v8, (dq, dk, dv), scale_o)
    if o_fp8:
        o = o.to(q.dtype) * (1.0 / scale_o).to(q.dtype)
    return o, stats


def _grad_scales(ratios: torch.Tensor, amax_do: torch.Tensor) -> torch.Tensor:
    return pow2_scale(ratios * amax_do, HEADROOM)


def backward(dout, q, k, v, out, stats, ratios) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v (in q's dtype); updates the layer's `ratios` (amax of dS, dQ, dK, dV over amax(dO))."""
    (do8, ddo, amax_do), (q8, dq_, _), (k8, dk_, _), (v8, dv_, _) = (quantize(t) for t in (dout, q, k, v))
    descales = (ddo, dq_, dk_, dv_)
    if q.device.type == "cuda":
        graphs = _graphs(q)
        if graphs.layout.o_dtype == "fp8":
            o_in, descale_o, _ = quantize(out)
        else:
            o_in, descale_o = out.contiguous(), torch.ones((), device=q.device)

        bf16_grads = graphs.layout.grad_dtype == "bf16"

        def run(scales):
            if bf16_grads:  # a bf16 dQ/dK/dV is written unscaled: only dS keeps its scale
                scales = torch.cat((scales[:1], torch.ones(3, device=scales.device)))
            return graphs.backward(q8, k8, v8, o_in, do8, stats, descales, descale_o, scales)
    else:
        def run(scales):
            return emulate_backward(do8, q8, k8, v8, out.float(), stats, descales, list(scales))
    calibrated = bool((ratios > 0).all())  # one host sync a call: a layer's first backward measures first
    if not calibrated:
        # dS's amax is taken before its scale, but dQ and dK come from the scaled e4m3 dS: the first pass
        # measures dS (and dV), the second, with dS scaled, dQ and dK
        _, _, _, amax = run(torch.ones(4, device=q.device))
        first = pow2_scale(amax[:1])
        _, _, _, amax = run(torch.cat((first, torch.ones(3, device=q.device))))
        ratios.copy_(amax / amax_do.clamp_min(1e-30))
    scales = _grad_scales(ratios, amax_do)
    dq, dk, dv, amax = run(scales)
    # a zero dO (nothing flowed back) says nothing about the ratios: keep them
    ratios.copy_(torch.where(amax_do > 0, amax / amax_do.clamp_min(1e-30), ratios))
    grads = []
    for i, g in enumerate((dq, dk, dv), start=1):
        if g.dtype == FP8:  # (on the CPU the emulation rounds through e4m3 and gives fp32 back)
            g = g.to(q.dtype) * (1.0 / scales[i]).to(q.dtype)
        grads.append(g.to(q.dtype).contiguous())
    return grads[0], grads[1], grads[2]
