"""Time and check every attention kernel at the 14B step's shape: forward, forward+backward and numerics.

Usage on the GPU machine, after installing flash-attn-4, SageAttention and the cuDNN frontend there. Their wheels
(113.8 MB, the 92 MB nvidia-cutlass-dsl-libs-cu13 one split in two: `split -b 50M`) are over one call's 64 MiB, so
they travel in two calls of one warm machine: in the repo, `.whl1/` = the cutlass wheel's part-aa with the
apache-tvm-ffi, nvidia-cutlass-dsl-libs-base/-core and torch-c-dlpack-ext wheels (58.5 MiB), `.whl/` = part-ab and
every other wheel (50.0 MiB), both in .git/info/exclude;

    call 1, carry [".whl1"]:  mkdir -p /tmp/wp && cp .whl1/* /tmp/wp/
    call 2, carry [".whl"]:   bash bench/gpu_wheels.sh /tmp/wp .whl /tmp/site &&
                              export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages &&
                              python3 bench/attention_backends.py --compile-check --out $OUT/attention_backends.jsonl

    python3 bench/attention_backends.py --tokens 4096 --heads 8 --backends sdpa_cudnn,fa4 --out x.jsonl

The shape defaults to one 832x480, 81-frame window with its reference frame: batch 1, 40 heads, 34,320 tokens,
head dim 128, bf16, full (non-causal) attention as in engine/models/attention.py. Inputs are [B, S, H, D] as the
model makes them (the SDPA backends get the same transposed views the engine passes).

FLOPs counted as the flash-attention papers do: forward 4*b*h*s*s*d (two matmuls of 2*s*s*d each per head);
backward 2.5x the forward (five matmuls, of which one recomputes S); forward+backward 3.5x. TFLOP/s of the
backward alone uses (fwd+bwd time - fwd time).

Numerics: every backend's output (and dq, dk, dv where it has a backward, for one fixed random upstream gradient)
against an fp32 reference on the same bf16 inputs (SDPA's memory-efficient kernel in fp32, which has a backward)
and against cuDNN bf16 (the project's current kernel): relative L2 ||x - ref|| / ||ref|| and cosine.

fp8 (`cudnn_fp8`): cuDNN's fp8 SDPA through nvidia-cudnn-frontend's graph API, e4m3 Q/K/V/O/dO/dQ/dK/dV with
per-tensor scales. The scales of O, dP, dQ, dK, dV are set from the amax outputs of one calibration call (the
delayed scaling a training loop would carry from the step before); the quantisation of the bf16 inputs is timed
apart (`quant_ms`) since a model would fuse it into the projection's epilogue or pay it. FA4's fp8 path is
forward-only and SM100-only (flash_attn/cute/interface.py asserts both), so it is not tried on Hopper.

Each backend that fails to import, build or run is one JSON line with its error; the rest still run. Timing:
warm-up calls (FA4 and cuDNN compile on the first), then CUDA events around each of --iters calls, median.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the engine, for engine_fa4

BACKENDS = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "fa4", "sage", "cudnn_fp8", "engine_fa4",
            "engine_cudnn_fp8", "sdpa_math")
DEFAULT_BACKENDS = BACKENDS[:-1]  # the math kernel holds the whole S x S score matrix: small shapes only
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(F.cosine_similarity(x.float().flatten(), ref.float().flatten(), dim=0))


def fwd_flops(b: int, h: int, s: int, d: int) -> float:
    return 4.0 * b * h * s * s * d


# ----- the backends: each is fwd(q, k, v) -> o on [B, S, H, D] and, where it has one, a differentiable fwd ------

def _sdpa(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
               "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}[kind]

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2)).transpose(1, 2)
    return run


def _fa4():
    # flash-attn-4's CuTe interface (flash_attn/cute/interface.py in the wheel)
    from flash_attn.cute import flash_attn_func

    def run(q, k, v):
        out, _lse = flash_attn_func(q, k, v)  # returns (out, lse); lse is None unless it is needed
        return out
    return run


def _engine(name):
    from engine.models.attention import attention, set_attention_backend

    set_attention_backend(name)
    return attention


def _engine_fp8():
    """The engine's cudnn_fp8 backend as the model calls it for self-attention, with one layer's scaling state."""
    from engine.models.attention import attention, set_attention_backend

    set_attention_backend("cudnn_fp8")
    ratios = torch.zeros(4, device="cuda")

    def run(q, k, v):
        return attention(q, k, v, self_attention=True, fp8_ratios=ratios)
    run.ratios = ratios
    return run


def emulation_check(device, tokens: int = 4096, heads: int = 8, seed: int = 1) -> dict:
    """The engine's fp8 kernels against engine.models.attention_fp8's emulation on the same e4m3 inputs and
    scales (and both against fp32), at a shape small enough for the emulation's full score matrix."""
    from engine.models import attention_fp8 as f8

    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(1, tokens, heads, 128, device=device, dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    ratios = torch.zeros(4, device=device)
    o, stats = f8.forward(q, k, v)
    dq, dk, dv = f8.backward(do, q, k, v, o, stats, ratios)
    layout = f8.kernel_layout()
    (q8, sq, _), (k8, sk, _), (v8, sv, _), (do8, sdo, amax_do) = (f8.quantize(t) for t in (q, k, v, do))
    eo, estats = f8.emulate_forward(q8, k8, v8, (sq, sk, sv), o_fp8=layout.o_dtype == "fp8")
    scales = list(f8._grad_scales(ratios, amax_do))
    if layout.grad_dtype == "bf16":
        scales[1:] = [None, None, None]
    edq, edk, edv, eamax = f8.emulate_backward(do8, q8, k8, v8, o.float(), stats, (sdo, sq, sk, sv), scales)
    ref = reference(q, k, v, do)
    out = {"kind": "emulation_check", "shape": [1, tokens, heads, 128], "layout": vars(layout),
           "kernel_amax": [float(x) for x in ratios * amax_do], "emulated_amax": [float(x) for x in eamax],
           "stats_max_abs_diff": float((stats - estats).abs().max())}
    for name, kern, emu in (("o", o, eo), ("dq", dq, edq), ("dk", dk, edk), ("dv", dv, edv)):
        out[f"{name}_kernel_vs_emulation_rel_l2"] = rel_l2(kern, emu)
        out[f"{name}_kernel_vs_fp32_rel_l2"] = rel_l2(kern, ref[name])
        out[f"{name}_emulation_vs_fp32_rel_l2"] = rel_l2(emu, ref[name])
    # Scales 64x too large (an amax 16x past the headroom): does the kernel saturate, or write NaN/inf?
    ratios.div_(64.0)
    over = f8.backward(do, q, k, v, o, stats, ratios.clone())
    out["overflowed_finite"] = all(bool(torch.isfinite(t.float()).all()) for t in over)
    out["overflowed_rel_l2"] = [rel_l2(t, ref[n]) for t, n in zip(over, ("dq", "dk", "dv"), strict=True)]
    return out


def _sage():
    from sageattention import sageattn

    def run(q, k, v):
        # sageattn subtracts k's mean from k in place (smooth_k): give it a copy, the inputs are shared.
        return sageattn(q, k.clone(), v, tensor_layout="NHD", is_causal=False)
    return run


class CudnnFp8:
    """cuDNN fp8 SDPA forward and backward graphs on [B, H, S, D] contiguous e4m3 tensors, per-tensor scales."""

    def __init__(self, b, h, s, d, device):
        import cudnn

        self.cudnn, self.device = cudnn, device
        self.shape = (b, h, s, d)
        self.handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        self.attn_scale = 1.0 / math.sqrt(d)
        self._build_forward()
        self._build_backward()

    def _graph(self):
        c = self.cudnn
        return c.pygraph(io_data_type=c.data_type.FP8_E4M3, intermediate_data_type=c.data_type.FLOAT,
                         compute_data_type=c.data_type.FLOAT, handle=self.handle)

    def _fp8(self, g):
        _b, h, s, d = self.shape
        return g.tensor(dim=self.shape, stride=(h * s * d, s * d, d, 1), data_type=self.cudnn.data_type.FP8_E4M3)

    def _scalar(self, g):
        return g.tensor(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=self.cudnn.data_type.FLOAT)

    def _finish(self, g):
        from engine.models.attention_fp8 import build_plans

        return torch.empty(build_plans(self.cudnn, g), device=self.device, dtype=torch.uint8)

    def _out(self, t, dim, dtype):
        stride = tuple(math.prod(dim[i + 1:]) for i in range(len(dim)))
        t.set_output(True).set_dim(dim).set_stride(stride).set_data_type(dtype)

    def _build_forward(self):
        c, g = self.cudnn, self._graph()
        b, h, s, _d = self.shape
        self.f_in = {n: self._fp8(g) for n in ("q", "k", "v")}
        self.f_sc = {n: self._scalar(g) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s",
                                                  "scale_o")}
        # amax_s stays virtual: the frontend says to set scale_s from P's bound (1, so 448 for e4m3) and that
        # declaring it an output restricts the graph to the older backend engines.
        o, stats, _amax_s, amax_o = g.sdpa_fp8(q=self.f_in["q"], k=self.f_in["k"], v=self.f_in["v"],
                                               generate_stats=True, attn_scale=self.attn_scale, **self.f_sc)
        self._out(o, self.shape, c.data_type.FP8_E4M3)
        self._out(stats, (b, h, s, 1), c.data_type.FLOAT)
        self._out(amax_o, (1, 1, 1, 1), c.data_type.FLOAT)
        self.f_out = {"o": o, "stats": stats, "amax_o": amax_o}
        self.f_graph, self.f_ws = g, self._finish(g)

    def _build_backward(self):
        c, g = self.cudnn, self._graph()
        b, h, s, _d = self.shape
        self.b_in = {n: self._fp8(g) for n in ("q", "k", "v", "o", "dO")}
        self.b_in["stats"] = g.tensor(dim=(b, h, s, 1), stride=(h * s, s, 1, 1), data_type=c.data_type.FLOAT)
        names = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
                 "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")
        self.b_sc = {n: self._scalar(g) for n in names}
        outs = g.sdpa_fp8_backward(attn_scale=self.attn_scale, **self.b_in, **self.b_sc)
        self.b_out = dict(zip(("dQ", "dK", "dV", "amax_dQ", "amax_dK", "amax_dV", "amax_dP"), outs))
        for n in ("dQ", "dK", "dV"):
            self._out(self.b_out[n], self.shape, c.data_type.FP8_E4M3)
        for n in ("amax_dQ", "amax_dK", "amax_dV", "amax_dP"):
            self._out(self.b_out[n], (1, 1, 1, 1), c.data_type.FLOAT)
        self.b_graph, self.b_ws = g, self._finish(g)

    def _scalars(self, values):
        """The scale tensors of `values`, made once per set of values (not inside the timed calls)."""
        key = tuple(sorted(values.items()))
        cache = self.__dict__.setdefault("_scalar_cache", {})
        if key not in cache:
            cache[key] = {n: torch.full((1, 1, 1, 1), float(v), device=self.device, dtype=torch.float32)
                          for n, v in values.items()}
        return cache[key]

    @staticmethod
    def quantize(x_bshd: torch.Tensor):
        """bf16 [B, S, H, D] -> (e4m3 [B, H, S, D] contiguous, descale) with amax mapped to FP8_MAX."""
        scale = FP8_MAX / float(x_bshd.abs().amax().clamp_min(1e-12))
        q8 = (x_bshd.transpose(1, 2).float() * scale).to(torch.float8_e4m3fn).contiguous()
        return q8, 1.0 / scale

    def calibrate(self, q8, k8, v8, descales, do8, do_descale):
        """Set every output scale from one call's amax outputs (what delayed scaling carries between steps)."""
        self.fwd_scales = {"descale_q": descales[0], "descale_k": descales[1], "descale_v": descales[2],
                           "scale_s": FP8_MAX, "descale_s": 1.0 / FP8_MAX, "scale_o": 1.0}
        o8, stats, amax = self.forward(q8, k8, v8)
        self.fwd_scales["scale_o"] = FP8_MAX / max(float(amax["amax_o"]), 1e-12)  # amax of O before scaling
        o8, stats, amax = self.forward(q8, k8, v8)
        self.bwd_scales = {"descale_q": descales[0], "descale_k": descales[1], "descale_v": descales[2],
                           "descale_o": 1.0 / self.fwd_scales["scale_o"], "descale_dO": do_descale,
                           "descale_s": 1.0 / FP8_MAX, "scale_s": FP8_MAX, "scale_dP": 1.0, "descale_dP": 1.0,
                           "scale_dQ": 1.0, "scale_dK": 1.0, "scale_dV": 1.0}
        for _ in range(2):  # dP's scale changes what dQ/dK/dV come out as: settle it first, then theirs
            _, bamax = self.backward(q8, k8, v8, o8, do8, stats)
            bamax = {n: float(t) for n, t in bamax.items()}
            scale_dp = FP8_MAX / max(bamax["amax_dP"], 1e-12)
            self.bwd_scales.update(scale_dP=scale_dp, descale_dP=1.0 / scale_dp)
            for n in ("dQ", "dK", "dV"):
                self.bwd_scales[f"scale_{n}"] = FP8_MAX / max(bamax[f"amax_{n}"], 1e-12)
        return o8, stats

    def forward(self, q8, k8, v8):
        b, h, s, _d = self.shape
        o8 = torch.empty(self.shape, device=self.device, dtype=torch.float8_e4m3fn)
        stats = torch.empty((b, h, s, 1), device=self.device, dtype=torch.float32)
        amax = {"amax_o": torch.empty((1, 1, 1, 1), device=self.device, dtype=torch.float32)}
        pack = {self.f_in["q"]: q8, self.f_in["k"]: k8, self.f_in["v"]: v8, self.f_out["o"]: o8,
                self.f_out["stats"]: stats, **{self.f_out[n]: t for n, t in amax.items()}}
        pack.update({self.f_sc[n]: t for n, t in self._scalars(self.fwd_scales).items()})
        self.f_graph.execute(pack, self.f_ws, handle=self.handle)
        return o8, stats, amax  # amax as tensors: reading them would synchronise inside the timed calls

    def backward(self, q8, k8, v8, o8, do8, stats):
        grads = {n: torch.empty(self.shape, device=self.device, dtype=torch.float8_e4m3fn) for n in ("dQ", "dK", "dV")}
        amax = {n: torch.empty((1, 1, 1, 1), device=self.device, dtype=torch.float32)
                for n in ("amax_dQ", "amax_dK", "amax_dV", "amax_dP")}
        pack = {self.b_in["q"]: q8, self.b_in["k"]: k8, self.b_in["v"]: v8, self.b_in["o"]: o8,
                self.b_in["dO"]: do8, self.b_in["stats"]: stats,
                **{self.b_out[n]: t for n, t in grads.items()}, **{self.b_out[n]: t for n, t in amax.items()}}
        pack.update({self.b_sc[n]: t for n, t in self._scalars(self.bwd_scales).items()})
        self.b_graph.execute(pack, self.b_ws, handle=self.handle)
        return grads, amax


# ----- timing ---------------------------------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, warmup: int, iters: int) -> tuple[float, float]:
    """Median and spread (max - min) in ms of `fn` over `iters` calls, CUDA events around each (the host clock
    on a machine without CUDA: the CPU proof of this script)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(iters):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), max(times) - min(times)


def numerics(prefix: str, got: dict, ref: dict) -> dict:
    out = {}
    for name, tensor in got.items():
        if name in ref:
            out[f"{prefix}_{name}_rel_l2"] = rel_l2(tensor, ref[name])
            out[f"{prefix}_{name}_cos"] = cosine(tensor, ref[name])
    return out


def run_autograd_backend(fn, q, k, v, do, args, has_backward: bool) -> tuple[dict, dict]:
    """Timings and the outputs ({"o", "dq", "dk", "dv"}) of one differentiable (or forward-only) backend."""
    t0 = time.perf_counter()
    with torch.no_grad():
        o = fn(q, k, v)
    _sync()
    result = {"first_call_s": time.perf_counter() - t0}
    with torch.no_grad():
        result["fwd_ms"], result["fwd_spread_ms"] = time_ms(lambda: fn(q, k, v), args.warmup, args.iters)
    outputs = {"o": o}
    if has_backward:
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

        def step():
            for t in (qg, kg, vg):
                t.grad = None
            fn(qg, kg, vg).backward(do)
        step()
        result["fwd_bwd_ms"], result["fwd_bwd_spread_ms"] = time_ms(step, args.warmup, args.iters)
        outputs.update(dq=qg.grad, dk=kg.grad, dv=vg.grad)
    return result, outputs


def run_cudnn_fp8(q, k, v, do, args) -> tuple[dict, dict]:
    b, s, h, d = q.shape
    t0 = time.perf_counter()
    f8 = CudnnFp8(b, h, s, d, q.device)
    (q8, dq_), (k8, dk_), (v8, dv_), (do8, ddo) = (CudnnFp8.quantize(t) for t in (q, k, v, do))
    o8, stats = f8.calibrate(q8, k8, v8, (dq_, dk_, dv_), do8, ddo)
    torch.cuda.synchronize()
    result = {"first_call_s": time.perf_counter() - t0, "scales": {**f8.fwd_scales, **f8.bwd_scales}}
    result["quant_ms"], _ = time_ms(lambda: [CudnnFp8.quantize(t) for t in (q, k, v)], 2, 5)
    result["fwd_ms"], result["fwd_spread_ms"] = time_ms(lambda: f8.forward(q8, k8, v8), args.warmup, args.iters)
    bwd_ms, bwd_spread = time_ms(lambda: f8.backward(q8, k8, v8, o8, do8, stats), args.warmup, args.iters)
    result["fwd_bwd_ms"], result["fwd_bwd_spread_ms"] = result["fwd_ms"] + bwd_ms, bwd_spread
    o8, stats, fwd_amax = f8.forward(q8, k8, v8)
    grads, bwd_amax = f8.backward(q8, k8, v8, o8, do8, stats)
    result["amax"] = {n: float(t) for n, t in {**fwd_amax, **bwd_amax}.items()}

    def back(t8, scale):  # e4m3 [B, H, S, D] -> float [B, S, H, D]
        return (t8.float() / scale).transpose(1, 2)
    sc = f8.bwd_scales
    outputs = {"o": back(o8, f8.fwd_scales["scale_o"]), "dq": back(grads["dQ"], sc["scale_dQ"]),
               "dk": back(grads["dK"], sc["scale_dK"]), "dv": back(grads["dV"], sc["scale_dV"])}
    return result, outputs


def reference(q, k, v, do) -> dict:
    """fp32 attention of the same bf16 inputs, with gradients, through SDPA's memory-efficient kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qf, kf, vf = (t.detach().float().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    # (the math kernel on the CPU proof's small shapes: the CPU has no memory-efficient kernel)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION if q.is_cuda else SDPBackend.MATH]):
        o = F.scaled_dot_product_attention(qf, kf, vf)
    o.backward(do.float().transpose(1, 2))
    return {"o": o.detach().transpose(1, 2), "dq": qf.grad.transpose(1, 2), "dk": kf.grad.transpose(1, 2),
            "dv": vf.grad.transpose(1, 2)}


def compile_check(q, k, v) -> dict:
    """Does the engine's fa4 attention trace into one graph under torch.compile (fullgraph=True)?"""
    from engine.models.attention import attention, set_attention_backend

    set_attention_backend("fa4")
    small = [t[:, :1024].detach().clone().requires_grad_(True) for t in (q, k, v)]
    fn = torch.compile(lambda a, b, c: attention(a, b, c) * 2, fullgraph=True)
    try:
        out = fn(*small)
        out.sum().backward()
        eager = attention(*[t.detach() for t in small]) * 2
        return {"compile_fullgraph": True, "compile_vs_eager_rel_l2": rel_l2(out.detach(), eager)}
    except Exception as exc:  # noqa: BLE001 - the report is the point
        return {"compile_fullgraph": False, "compile_error": f"{type(exc).__name__}: {str(exc)[:400]}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=34320)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                    help="comma-separated, of: " + ", ".join(BACKENDS) + " (default: all but sdpa_math)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="skip the fp32 reference (numerics vs cuDNN only)")
    ap.add_argument("--compile-check", action="store_true", help="torch.compile the engine's fa4 attention")
    ap.add_argument("--emulation-check", action="store_true",
                    help="the engine's fp8 kernels against their emulation (engine/models/attention_fp8.py)")
    ap.add_argument("--out", required=True, help="JSON lines file to append to")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (the script's own CPU proof)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        ap.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("attention_backends.py times CUDA kernels; no CUDA device is visible (--device cpu runs "
                         "its CPU proof)")

    b, h, s, d = args.batch, args.heads, args.tokens, args.head_dim
    g = torch.Generator(device=dev).manual_seed(args.seed)
    q, k, v, do = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
    flops = fwd_flops(b, h, s, d)
    header = {"kind": "header", "shape": [b, s, h, d], "dtype": "bfloat16", "fwd_flops": flops,
              "bwd_flops_factor": 2.5, "device": str(dev), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version()}
    if dev.type == "cuda":
        header.update(gpu=torch.cuda.get_device_name(dev),
                      capability=".".join(map(str, torch.cuda.get_device_capability(dev))))
    lines = [header]
    refs = {}
    if not args.no_reference:
        try:
            refs["fp32"] = reference(q, k, v, do)
        except Exception as exc:  # noqa: BLE001 - said in the header; numerics then only against cuDNN bf16
            header["fp32_reference_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        torch.cuda.empty_cache()
    try:
        _, refs["cudnn"] = run_autograd_backend(_sdpa("sdpa_cudnn"), q, k, v, do, argparse.Namespace(
            warmup=1, iters=1), has_backward=True)
    except Exception as exc:  # noqa: BLE001
        header["cudnn_reference_error"] = f"{type(exc).__name__}: {exc}"

    for name in names:
        line = {"kind": "backend", "backend": name}
        try:
            if name == "cudnn_fp8":
                result, outputs = run_cudnn_fp8(q, k, v, do, args)
            else:
                fn = {"fa4": _fa4, "sage": _sage, "engine_cudnn_fp8": _engine_fp8}.get(name)
                fn = fn() if fn else _engine("fa4") if name == "engine_fa4" else _sdpa(name)
                result, outputs = run_autograd_backend(fn, q, k, v, do, args, has_backward=name != "sage")
            line.update(result)
            if name == "engine_cudnn_fp8":
                from engine.models.attention_fp8 import kernel_layout

                line.update(layout=vars(kernel_layout()), ratios=[float(x) for x in fn.ratios])
            line["fwd_tflops"] = flops / (line["fwd_ms"] * 1e-3) / 1e12
            if "fwd_bwd_ms" in line:
                line["bwd_ms"] = line["fwd_bwd_ms"] - line["fwd_ms"]
                line["bwd_tflops"] = 2.5 * flops / (line["bwd_ms"] * 1e-3) / 1e12
                line["fwd_bwd_tflops"] = 3.5 * flops / (line["fwd_bwd_ms"] * 1e-3) / 1e12
            for ref_name, ref in refs.items():
                line.update(numerics(f"vs_{ref_name}", outputs, ref))
            if any(not torch.isfinite(t.float()).all() for t in outputs.values()):
                line["nonfinite"] = True
        except Exception as exc:  # noqa: BLE001 - one line per failing backend, the others still run
            line["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
            line["traceback_tail"] = traceback.format_exc().splitlines()[-4:]
        torch.cuda.empty_cache()
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.emulation_check:
        try:
            lines.append(emulation_check(dev))
        except Exception as exc:  # noqa: BLE001
            lines.append({"kind": "emulation_check", "error": f"{type(exc).__name__}: {str(exc)[:600]}",
                          "traceback_tail": traceback.format_exc().splitlines()[-4:]})
        print(json.dumps(lines[-1]), flush=True)
    if args.compile_check:
        lines.append({"kind": "compile_check", **compile_check(q, k, v)})
        print(json.dumps(lines[-1]), flush=True)
    with open(args.out, "a") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    for line in lines[1:]:
        if line.get("kind") != "backend":
            continue
        if "error" in line:
            print(f"{line['backend']:>15}  error: {line['error'][:100]}")
            continue
        bwd = f"bwd {line['bwd_ms']:8.2f} ms {line['bwd_tflops']:6.0f} TF/s" if "bwd_ms" in line else "no backward"
        err = line.get("vs_fp32_o_rel_l2", line.get("vs_cudnn_o_rel_l2", float("nan")))
        print(f"{line['backend']:>15}  fwd {line['fwd_ms']:8.2f} ms {line['fwd_tflops']:6.0f} TF/s  {bwd}  "
              f"out rel_l2 {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
