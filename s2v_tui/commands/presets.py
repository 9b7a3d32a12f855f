"""`s2v-tui presets`: the presets with the memory each needs against this machine's GPUs and host RAM.

Needs come from the engine's memory model (calibrated on measured 14B steps, BENCHMARKS.md); free GPU memory
from NVML (or `--vram-gb` when there is no NVIDIA driver, or to plan for another card); available host RAM from
the live reading (or `--host-gb`, to plan for another host). The preset to pick is the engine's choice
(`engine.presets.choose_preset`), the same one the Presets screen and the pre-flight check make.
"""
from __future__ import annotations

import argparse
import json
import sys

GIB = 2**30


def _gib_amount(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of GiB")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s2v-tui presets", description=__doc__.splitlines()[0])
    p.add_argument("--vram-gb", type=_gib_amount, help="plan for a card with this much free GPU memory (GiB)")
    p.add_argument("--host-gb", type=_gib_amount,
                   help="plan for this much available host RAM (GiB; default: what this machine has available now)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from engine.gpu import default_probe, host_memory
    from engine.memory import estimate
    from engine.presets import choose_preset, shipped_presets

    probe = default_probe()
    gpus = probe.snapshots() if probe.available else []
    free = int(args.vram_gb * GIB) if args.vram_gb else max((g.free_bytes or 0 for g in gpus), default=None)
    host = int(args.host_gb * GIB) if args.host_gb else host_memory().available_bytes
    estimates = {name: estimate(cfg) for name, cfg in shipped_presets().items()}
    choice = choose_preset([(n, e.vram_need_bytes, e.host_bytes) for n, e in estimates.items()], free, host)
    rows = []
    for fit in choice.rows:
        est = estimates[fit.name]
        rows.append({
            # What the card must have free (allocated peak + 5%); the allocator's uncapped reserve is larger.
            "preset": fit.name, "gpu_gib": round(est.vram_need_bytes / GIB, 1),
            "gpu_peak_allocated_gib": round(est.vram_bytes / GIB, 1), "host_gib": round(est.host_bytes / GIB, 1),
            "tokens": est.tokens, "fits_gpu": fit.fits_gpu, "fits_host": fit.fits_host, "fits": fit.fits,
            "recommended": fit.name == choice.best,
        })
    if args.json:
        print(json.dumps({"gpus": [g.name for g in gpus], "free_vram_gib": None if free is None else free / GIB,
                          "host_available_gib": host / GIB, "recommended": choice.best, "presets": rows,
                          "nothing_fits": {"short": choice.short, "preset": choice.short_preset,
                                           "short_gib": round(choice.short_bytes / GIB, 1),
                                           "message": choice.why_none} if choice.short else None}, indent=2))
        return 0
    if gpus:
        for g in gpus:
            print(f"GPU {g.index}: {g.name}, {(g.free_bytes or 0) / GIB:.1f} GiB free of {(g.total_bytes or 0) / GIB:.1f}")
    elif free is None:
        print(f"no NVIDIA GPU readable ({probe.reason}); pass --vram-gb to plan for a card")
    print(f"host RAM available: {host / GIB:.1f} GiB" + ("" if args.host_gb else " (pass --host-gb to plan for another host)"))
    print(f"{'preset':<12} {'GPU GiB':>8} {'host GiB':>9}  fits")
    for r in rows:
        mark = "  <- recommended" if r["recommended"] else ""
        why = "" if r["fits"] is not False else " (GPU memory)" if r["fits_gpu"] is False else " (host RAM)"
        print(f"{r['preset']:<12} {r['gpu_gib']:>8.1f} {r['host_gib']:>9.1f}  "
              f"{ {True: 'yes', False: 'no', None: '?'}[r['fits']] }{why}{mark}")
    if choice.why_none:
        print(choice.why_none)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
