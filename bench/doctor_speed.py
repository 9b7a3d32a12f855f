"""Dataset doctor speed on this machine (CPU only): seconds to check N clips.

    python -m bench.doctor_speed --clips 1000 --seconds 10 --size 640x360

Writes `--distinct` synthetic talking clips (H.264 + 48 kHz AAC), copies them up to `--clips` files with
captions in a temporary folder, then times `inspect_datasets` (warm page cache: the second of two runs)
and prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from engine.data import synth
from engine.data.doctor import DoctorSettings, inspect_datasets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--distinct", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--fps", type=float, default=30)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="doctor_speed_") as tmp:
        src, ds = Path(tmp) / "src", Path(tmp) / "ds"
        made = [synth.make_talking_clip(src, f"s{i}", fps=args.fps, size=(w, h), duration_s=args.seconds,
                                        audio_rate=48000, seed=i, use_espeak=False) for i in range(args.distinct)]
        ds.mkdir()
        for i in range(args.clips):
            clip = made[i % len(made)]
            shutil.copyfile(clip.video, ds / f"c{i:05d}.mp4")
            shutil.copyfile(clip.caption, ds / f"c{i:05d}.txt")
        settings = DoctorSettings(workers=args.workers)
        inspect_datasets([ds], settings)  # warm the page cache
        t0 = time.perf_counter()
        report = inspect_datasets([ds], settings)
        elapsed = time.perf_counter() - t0
    print(json.dumps({"clips": len(report.clips), "seconds": round(elapsed, 2),
                      "seconds_per_1000": round(elapsed * 1000 / max(1, len(report.clips)), 2),
                      "clip": f"{w}x{h} {args.fps:g} fps {args.seconds:g} s h264+aac48k",
                      "workers": args.workers or min(8, os.cpu_count() or 1), "cpus": os.cpu_count(),
                      "problems": len(report.all_problems)}))


if __name__ == "__main__":
    main()
