"""Host RAM of the engine's load path for low-bit base weights, measured at reduced depth (the CPU by default).

Two paths, each in a fresh process on a model of the 14B's width and a few blocks (the full model does not fit
the CI-class machine), written in 5 GB shards as the benches do:

- `old`: the folder loaded in bf16 onto the CPU, then every Linear of the families quantised
  (quantize_base_linears): the whole bf16 model is held once (as the shards' mapped pages);
- `new`: the folder loaded with `low_bit=LowBitSpec(...)` (engine.models.loading): each Linear is quantised as
  soon as its tensors are read, so the host holds the low-bit model and one bf16 Linear beyond it. On the CPU
  (the default) this is the case where the low-bit model stays in host memory (a streamed low-bit base).

`--device cuda` measures the runner's own paths instead (engine.runner._load_model): `new` loads and quantises on
the GPU; `old` is the former runner, the bf16 model loaded into host memory and quantised onto the GPU.

Reported per path, over the process baseline: the peak RSS (the kernel's high-water mark VmHWM: getrusage's
ru_maxrss is not used, a child process starts with its parent's, here the writer's), and from a sampler
(every 10 ms) the peak anonymous RSS, the peak file-backed RSS (the safetensors shards' mapped pages: counted
in RSS, reclaimable by the kernel) and the peak of the system's used memory (total - available: what other
processes cannot have; includes their changes on a shared machine).

    python bench/load_host.py --layers 6 --scratch /tmp/lh
    python bench/load_host.py --layers 40 --device cuda --scratch /local/disk/lh   # needs the GPU machine
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import emit_result  # noqa: E402
from engine.gpu import host_memory  # noqa: E402

GIB = 2**30
PATHS = ("old", "new")


def _status_bytes() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process (Linux /proc), in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """Peaks of this process's anonymous and file-backed RSS and of the system's used memory, sampled."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.every_s = every_s
        self.peak = {"RssAnon": 0, "RssFile": 0, "used": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        now = _status_bytes()
        now["used"] = host_memory().used_bytes
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now[key])

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def write(folder: Path, layers: int, tiny: bool = False) -> int:
    import torch

    from engine.models.s2v_transformer import S2VTransformer3DModel

    if tiny:  # the tests' model: checks this script, measures nothing
        from engine.models.tiny import write_tiny_model

        write_tiny_model(folder, seed=0)
        model = S2VTransformer3DModel.from_pretrained(str(folder), subfolder="transformer")
        return sum(p.numel() for p in model.parameters())

    inject = tuple(i for i in range(0, layers, 4))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = S2VTransformer3DModel(num_layers=layers, audio_inject_layers=inject)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(folder / "transformer", max_shard_size="5GB")
    return sum(p.numel() for p in model.parameters())


def _model_gib(model) -> float:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / GIB


def measure(folder: Path, kind: str, path: str, device: str = "cpu") -> dict:
    import torch

    from engine.models.low_bit_linear import DEFAULT_FAMILIES, LowBitSpec, held_low_bit, quantize_base_linears
    from engine.models.s2v_transformer import S2VTransformer3DModel

    cpu, target = torch.device("cpu"), torch.device(device)
    start = _status_bytes()
    base, base_used = start["VmRSS"] / GIB, host_memory().used_bytes / GIB
    t0 = time.perf_counter()
    out: dict = {}
    with Sampler() as sampler:
        if path == "old":
            model = S2VTransformer3DModel.from_pretrained(str(folder), subfolder="transformer",
                                                          torch_dtype=torch.bfloat16, device=cpu)
            out["bf16_model_gib"] = round(_model_gib(model), 3)
            out["rss_after_load_gib"] = round(_status_bytes()["VmRSS"] / GIB, 3)
            out["peak_rss_load_gib"] = round(_status_bytes()["VmHWM"] / GIB, 3)
            model.requires_grad_(False)  # the engine's LoRA step freezes the base before the switches quantise it
            count = quantize_base_linears(model, device=target, kind=kind)
            model.to(target)
        else:
            model = S2VTransformer3DModel.from_pretrained(str(folder), subfolder="transformer",
                                                          torch_dtype=torch.bfloat16, device=target,
                                                          low_bit=LowBitSpec(kind, DEFAULT_FAMILIES))
            count = sum(held_low_bit(model).values())
        if target.type == "cuda":
            torch.cuda.synchronize(target)
            out["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated(target) / GIB, 3)
    seconds = time.perf_counter() - t0
    after = _status_bytes()
    peak = after["VmHWM"] / GIB
    low_bit_gib = _model_gib(model)
    on_host = low_bit_gib if target.type == "cpu" else 0.0  # the "over" figures leave out a model on the host only
    return out | {
        "path": path, "device": device, "low_bit_model_gib": round(low_bit_gib, 3), "linears": count,
        "baseline_rss_gib": round(base, 3), "peak_rss_total_gib": round(peak, 3),
        "rss_after_gib": round(after["VmRSS"] / GIB, 3), "rss_file_after_gib": round(after["RssFile"] / GIB, 3),
        "peak_rss_anon_gib": round(sampler.peak["RssAnon"] / GIB, 3),
        "baseline_rss_file_gib": round(start["RssFile"] / GIB, 3),  # the libraries' mapped pages
        "peak_rss_file_gib": round(sampler.peak["RssFile"] / GIB, 3),
        "baseline_used_gib": round(base_used, 3), "peak_used_gib": round(sampler.peak["used"] / GIB, 3),
        "peak_rss_over_low_bit_model_gib": round(peak - base - on_host, 3),
        "peak_anon_over_low_bit_model_gib": round((sampler.peak["RssAnon"] - start["RssAnon"]) / GIB - on_host, 3),
        "peak_used_over_low_bit_model_gib": round(sampler.peak["used"] / GIB - base_used - on_host, 3),
        "load_quantise_s": round(seconds, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--kind", choices=("fp8", "int8"), default="fp8")
    ap.add_argument("--path", choices=(*PATHS, "both"), default="both", help="which load path to measure")
    ap.add_argument("--device", default="cpu", help="where the model is loaded: cpu, or cuda (the runner's path)")
    ap.add_argument("--scratch", default="/tmp/load-host")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (checks the script)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: measure this folder
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.kind, args.path, args.device)))
        return 0
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        params = write(scratch / "m", args.layers, args.tiny)
        for path in PATHS if args.path == "both" else (args.path,):
            # A fresh process for each: neither the writer's memory nor the other path's is in the figures.
            out = subprocess.run([sys.executable, __file__, "--measure", str(scratch / "m"), "--kind", args.kind,
                                  "--path", path, "--device", args.device], capture_output=True, text=True,
                                 check=True).stdout
            results.append(json.loads(out.splitlines()[-1]))
    finally:
        shutil.rmtree(scratch / "m", ignore_errors=True)
    for r in results:
        emit_result({"bench": "load_host", "tiny": args.tiny, "layers": None if args.tiny else args.layers,
                     "params": params, "kind": args.kind} | r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
