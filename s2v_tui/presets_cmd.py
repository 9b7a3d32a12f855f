"""`s2v-tui presets`: the VRAM presets with the memory each needs against this machine's GPUs and host RAM.

Needs come from the engine's memory model (calibrated on measured 14B steps, BENCHMARKS.md); free memory from
NVML (or `--vram-gb` when there is no NVIDIA driver, or to plan for another card).
"""
from __future__ import annotations

import argparse
import json
import sys

GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s2v-tui presets", description=__doc__.splitlines()[0])
    p.add_argument("--vram-gb", type=float, help="plan for a card with this much free GPU memory (GiB)")
    p.add_argument("--host-gb", type=float, help="plan for this much available host RAM (GiB)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from engine.gpu import default_probe, host_memory
    from engine.memory import estimate, recommend, shipped_presets

    probe = default_probe()
    gpus = probe.snapshots() if probe.available else []
    free = int(args.vram_gb * GIB) if args.vram_gb else max((g.free_bytes or 0 for g in gpus), default=None)
    host = int(args.host_gb * GIB) if args.host_gb else host_memory().available_bytes
    presets = shipped_presets()
    best = recommend(presets, free, host) if free is not None else None
    rows = []
    for name, cfg in presets.items():
        est = estimate(cfg)
        rows.append({
            # What the card must have free (allocated peak + 5%); the allocator's uncapped reserve is larger.
            "preset": name, "gpu_gib": round(est.vram_need_bytes / GIB, 1),
            "gpu_peak_allocated_gib": round(est.vram_bytes / GIB, 1), "host_gib": round(est.host_bytes / GIB, 1),
            "tokens": est.tokens,
            "fits": None if free is None else (est.vram_need_bytes <= free and est.host_bytes <= host),
            "recommended": name == best,
        })
    if args.json:
        print(json.dumps({"gpus": [g.name for g in gpus], "free_vram_gib": None if free is None else free / GIB,
                          "host_available_gib": host / GIB, "presets": rows}, indent=2))
        return 0
    if gpus:
        for g in gpus:
            print(f"GPU {g.index}: {g.name}, {(g.free_bytes or 0) / GIB:.1f} GiB free of {(g.total_bytes or 0) / GIB:.1f}")
    elif free is None:
        print(f"no NVIDIA GPU readable ({probe.reason}); pass --vram-gb to plan for a card")
    print(f"host RAM available: {host / GIB:.1f} GiB")
    print(f"{'preset':<8} {'GPU GiB':>8} {'host GiB':>9}  fits")
    for r in rows:
        mark = "  <- recommended" if r["recommended"] else ""
        print(f"{r['preset']:<8} {r['gpu_gib']:>8.1f} {r['host_gib']:>9.1f}  { {True: 'yes', False: 'no', None: '?'}[r['fits']] }{mark}")
    if best is None and free is not None:
        print(why_nothing_fits(rows, free, host))
    return 0


def why_nothing_fits(rows: list[dict], free: int, host: int) -> str:
    """What is short when no preset fits: host RAM for the presets the card could hold, else GPU memory."""
    gpu_ok = [r for r in rows if r["gpu_gib"] * GIB <= free]
    if gpu_ok:
        r = min(gpu_ok, key=lambda r: r["host_gib"])
        return (f"no preset fits: {r['preset']} fits this card ({r['gpu_gib']:.1f} GiB of GPU memory) but needs "
                f"{r['host_gib']:.1f} GiB of host RAM, {host / GIB:.1f} GiB are available: free host RAM (close other "
                "programs) or use a host with more")
    r = min(rows, key=lambda r: r["gpu_gib"])
    return (f"no preset fits: the smallest, {r['preset']}, needs {r['gpu_gib']:.1f} GiB of GPU memory, "
            f"{free / GIB:.1f} GiB are free: free GPU memory (other processes) or train fewer frames / a smaller "
            "resolution")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
