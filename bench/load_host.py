"""Host RAM of the engine's load path for low-bit base weights, measured on the CPU at reduced depth.

The 32gb preset loads the bf16 model into host memory and makes the fp8 (or int8) Linears from it layer by
layer (engine.runner._load_model, engine.models.low_bit_linear.quantize_base_linears). The memory model plans
the whole bf16 model once in host RAM for that. This script checks that premise on a model of the 14B's width
and a few blocks (the full model does not fit the CI-class machine): it writes the folder in 5 GB shards as the
benches do, then, in a fresh process, records the peak RSS over the process baseline while loading the folder
to the CPU and quantising it, as a multiple of the bf16 model's bytes.

    python bench/load_host.py --layers 6 --scratch /tmp/lh
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import emit_result, peak_host_rss_gib  # noqa: E402
from engine.gpu import host_memory  # noqa: E402


def rss_gib() -> float:
    return host_memory().process_rss_bytes / 2**30


def peak_gib() -> float:
    return peak_host_rss_gib(ndigits=None)


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


def measure(folder: Path, kind: str) -> dict:
    import torch

    from engine.models.low_bit_linear import quantize_base_linears
    from engine.models.s2v_transformer import S2VTransformer3DModel

    base = rss_gib()
    t0 = time.perf_counter()
    model = S2VTransformer3DModel.from_pretrained(str(folder), subfolder="transformer", torch_dtype=torch.bfloat16,
                                                  device=torch.device("cpu"))
    loaded = rss_gib()
    peak_load = peak_gib()
    bf16_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    model.requires_grad_(False)  # the engine's LoRA step freezes the base before the switches quantise it
    count = quantize_base_linears(model, device=torch.device("cpu"), kind=kind)
    after = rss_gib()
    return {"bf16_model_gib": round(bf16_gib, 3), "baseline_rss_gib": round(base, 3),
            "rss_after_load_gib": round(loaded, 3), "peak_rss_load_gib": round(peak_load, 3),
            "peak_rss_total_gib": round(peak_gib(), 3), "rss_after_quantise_gib": round(after, 3),
            "linears": count, "load_quantise_s": round(time.perf_counter() - t0, 1),
            "peak_over_baseline_per_model": round((peak_gib() - base) / bf16_gib, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--kind", choices=("fp8", "int8"), default="fp8")
    ap.add_argument("--scratch", default="/tmp/load-host")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (checks the script)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: measure this folder
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.kind)))
        return 0
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        params = write(scratch / "m", args.layers, args.tiny)
        # A fresh process: the writer's own memory is not in the figures.
        out = subprocess.run([sys.executable, __file__, "--measure", str(scratch / "m"), "--kind", args.kind],
                             capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    finally:
        shutil.rmtree(scratch / "m", ignore_errors=True)
    result = {"bench": "load_host", "tiny": args.tiny, "layers": None if args.tiny else args.layers, "params": params,
              "kind": args.kind} | json.loads(out)
    emit_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
