"""Host RAM and copy speed of exact-size pinned slabs against torch's pinned tensors, on a CUDA machine.

The engine keeps streamed block weights and saved block inputs in slabs (engine/models/pinned_slab.py) instead of
torch's pinned tensors, which its host allocator rounds up to powers of two. This checks both claims the memory
model now rests on: the process's resident memory grows by the tensors' own bytes (not the rounded ones), and
copies from and to slab views run as fast as from torch's pinned memory.

The tensors are the 14B model's: the frozen tensors of `--units` streamed units (block + injector; 4 units are
2.91 GiB in 120 tensors from 10 KiB to 135 MiB) and `--inputs` saved block inputs of [--tokens, 5120] bf16 (0.33 GiB
each at 35,074 tokens, which torch rounds to 0.5). Each way of holding them runs in a fresh process, so none sees
another's cached memory:
  slab           the engine's way: one slab for the weights, filled then locked; one locked slab per input
  torch_each     torch.empty(..., pin_memory=True) per tensor (the engine before the slabs)
  torch_register the same under PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True
  torch_one      one pinned torch tensor per kind cut into views (rounded once)
  pageable       ordinary memory (copy-speed baseline only)
Per way: RSS growth over the process after CUDA start-up (psutil), peak RSS growth, setup seconds, whether torch
calls the buffers pinned, and GB/s of
host-to-GPU copies of the weights (the streaming direction) and GPU-to-host and back of the inputs, each the best
of 5 passes over all tensors, non-blocking on one side stream, timed with CUDA events. One JSON line.

    python bench/pinned_slab_check.py --units 4 --inputs 8 --json bench/results/pinned-slab.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import emit_result, peak_host_rss_gib  # noqa: E402
from engine.gpu import host_memory  # noqa: E402

WAYS = ("slab", "torch_each", "torch_register", "torch_one", "pageable")
GIB = 2**30


def tensor_shapes(units: int, inputs: int, tokens: int) -> tuple[list[tuple], list[tuple]]:
    """(weight shapes, input shapes): the 14B model's frozen tensors of units 0..units-1 (blocks with their audio
    injectors) and `inputs` block inputs."""
    from engine.memory import unit_tensor_shapes

    return [s for i in range(units) for s in unit_tensor_shapes(i)], [(tokens, 5120)] * inputs


def _rss() -> int:
    return host_memory().process_rss_bytes


def _hold(way: str, weights: list[torch.Tensor], input_shapes, dtype) -> tuple[list, list, list]:
    """Host copies of `weights` (the sources are dropped as they are copied, as block streaming does) and host
    buffers for the inputs, held the given way; also returns whatever must stay alive."""
    import torch

    from engine.models.pinned_slab import PinnedSlab, tensor_bytes, views_bytes

    keep = []
    if way == "slab":
        slab = PinnedSlab(views_bytes(tensor_bytes(w.shape, dtype) for w in weights), pin=False)
        host_w = []
        while weights:
            w = weights.pop(0)
            host_w.append(slab.view(w.shape, dtype).copy_(w))
        slab.pin()
        slots = [PinnedSlab(tensor_bytes(s, dtype), pin=True) for s in input_shapes]
        keep = [slab, *slots]
        return host_w, [slot.view(s, dtype) for slot, s in zip(slots, input_shapes)], keep
    if way == "torch_one":
        def cut(shapes):
            total = sum(tensor_bytes(s, dtype) for s in shapes)
            big = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            keep.append(big)
            views, at = [], 0
            for s in shapes:
                n = tensor_bytes(s, dtype)
                views.append(big[at:at + n].view(dtype).view(s))
                at += n
            return views
        host_w = cut([tuple(w.shape) for w in weights])
        for h in host_w:
            h.copy_(weights.pop(0))
        return host_w, cut(input_shapes), keep
    pin = way != "pageable"
    host_w = []
    while weights:
        w = weights.pop(0)
        host_w.append(torch.empty(w.shape, dtype=dtype, pin_memory=pin).copy_(w))
    return host_w, [torch.empty(s, dtype=dtype, pin_memory=pin) for s in input_shapes], keep


def _gbps(pairs, reps: int = 5) -> float:
    """Best GB/s of copying every (dst, src) pair once, non-blocking on a side stream."""
    import torch

    stream = torch.cuda.Stream()
    nbytes = sum(s.numel() * s.element_size() for _, s in pairs)
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            start.record(stream)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            end.record(stream)
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return round(nbytes / best / 1e9, 2)


def measure(way: str, units: int, inputs: int, tokens: int) -> dict:
    import torch

    from engine.models.pinned_slab import tensor_bytes

    dtype = torch.bfloat16
    w_shapes, in_shapes = tensor_shapes(units, inputs, tokens)
    torch.cuda.init()
    gpu_w = [torch.empty(s, dtype=dtype, device="cuda") for s in w_shapes]
    gpu_in = [torch.randn(s, device="cuda").to(dtype) for s in in_shapes[:1]] * len(in_shapes)
    torch.cuda.synchronize()
    base, base_peak = _rss(), peak_host_rss_gib(None) * GIB
    sources = [torch.randn(s).to(dtype) for s in w_shapes]  # the model's block weights, ordinary memory
    with_sources = _rss()
    t0 = time.perf_counter()
    host_w, host_in, keep = _hold(way, sources, in_shapes, dtype)
    setup_s = time.perf_counter() - t0
    held = _rss()
    exact_w = sum(tensor_bytes(s, dtype) for s in w_shapes)
    exact_in = sum(tensor_bytes(s, dtype) for s in in_shapes)
    return {
        "way": way, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "weights_gib": round(exact_w / GIB, 3), "inputs_gib": round(exact_in / GIB, 3),
        "rss_growth_gib": round((held - base) / GIB, 3), "peak_rss_growth_gib": round(
            (peak_host_rss_gib(None) * GIB - max(base, base_peak)) / GIB, 3),
        "sources_gib": round((with_sources - base) / GIB, 3), "setup_s": round(setup_s, 2),
        # torch 2.11's is_pinned() answers False for memory registered outside its own allocator (seen on the H200
        # machine); the copy speed against `pageable` is what shows the slab is page-locked.
        "torch_is_pinned": all(t.is_pinned() for t in host_w + host_in),
        "h2d_weights_gbps": _gbps(list(zip(gpu_w, host_w))),
        "d2h_inputs_gbps": _gbps(list(zip(host_in, gpu_in))),
        "h2d_inputs_gbps": _gbps(list(zip(gpu_in, host_in))),
        "kept": len(keep),
    }


def expected(units: int, inputs: int, tokens: int) -> dict:
    """What the memory model counts for the same tensors: slab sizes and torch's power-of-two sizes."""
    from engine.memory import pinned_bytes
    from engine.models.pinned_slab import slab_bytes, views_bytes

    w_shapes, in_shapes = tensor_shapes(units, inputs, tokens)
    w = [2 * math.prod(s) for s in w_shapes]
    i = [2 * math.prod(s) for s in in_shapes]
    return {"slab_gib": round((slab_bytes(views_bytes(w)) + sum(slab_bytes(n) for n in i)) / GIB, 3),
            "torch_rounded_gib": round(sum(pinned_bytes(n) for n in w + i) / GIB, 3), "tensors": len(w) + len(i)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=4)
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=35_074)
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--way", help=argparse.SUPPRESS)  # the child process: measure this way
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.way:
        print(json.dumps(measure(args.way, args.units, args.inputs, args.tokens)))
        return 0
    result = {"bench": "pinned_slab_check", "units": args.units, "inputs": args.inputs, "tokens": args.tokens,
              "expected": expected(args.units, args.inputs, args.tokens)}
    import torch

    if not torch.cuda.is_available():
        result["status"] = "no CUDA device: this check measures pinned memory and runs only on a GPU machine"
        emit_result(result, args.json)
        return 1
    result["torch"], result["device"] = torch.__version__, torch.cuda.get_device_name()
    rows = []
    for way in args.ways.split(","):
        env = dict(os.environ)
        if way == "torch_register":
            env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(
                x for x in (env.get("PYTORCH_CUDA_ALLOC_CONF"),
                            "pinned_use_cuda_host_register:True,pinned_num_register_threads:8") if x)
        cmd = [sys.executable, __file__, "--way", way, "--units", str(args.units), "--inputs", str(args.inputs),
               "--tokens", str(args.tokens)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            rows.append({"way": way, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.splitlines()[-1]))
    result["status"] = "completed" if all("error" not in r for r in rows) else "failed"
    result["ways"] = rows
    emit_result(result, args.json)
    return 0 if result["status"] == "completed" else 2


if __name__ == "__main__":
    sys.exit(main())
