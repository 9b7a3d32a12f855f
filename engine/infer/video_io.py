"""The sample's mp4: 16 fps video (h264, mpeg4 where no h264 encoder is built in) with the driving audio (aac).

Encoding is engine.data.synth.write_video (one PyAV writer for the project); this module only picks the codec
and writes atomically, so a half-written sample never sits next to finished ones.
"""
from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from engine.data.synth import write_video
from engine.data.windows import MODEL_FPS
from engine.infer.audio import SAMPLE_RATE


def video_codec() -> str:
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return "h264" if name == "libx264" else name
        except (av.error.FFmpegError, ValueError):  # the PyAV build lacks this encoder
            continue
    raise RuntimeError("this PyAV build has neither an h264 nor an mpeg4 encoder; install the PyAV wheel "
                       "from PyPI (pip install --force-reinstall av)")


def write_sample_mp4(path: str | Path, frames: np.ndarray, audio: np.ndarray | None,
                     fps: int = MODEL_FPS, audio_rate: int = SAMPLE_RATE) -> Path:
    """frames uint8 [F, H, W, 3]; audio float32 mono at `audio_rate` (None: a silent video)."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"{path}: samples are written as .mp4; give a file name ending in .mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.mp4")
    try:
        write_video(tmp, np.asarray(frames), fps, codec=video_codec(), audio=audio, audio_rate=audio_rate)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
