"""Everything one training window needs from its clip, decoded and aligned: the API the caches build on.

A WindowSample holds the motion frames and the new frames (uint8, cropped to the bucket), the audio of
exactly the same span at 16 kHz mono, and the reference image in the same bucket. Frame j of `frames`
is at time (window.motion_start + j) / 16 s and its audio is samples [1000 j, 1000 (j + 1)).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data import media
from engine.data.discover import ClipSource
from engine.data.problems import DataError, make_problem
from engine.data.windows import MODEL_FPS, CropPlan, Window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowSample:
    clip: ClipSource
    window: Window
    frames: np.ndarray  # uint8 [motion_frames + frames, H, W, 3]
    audio: np.ndarray  # float32 [(motion_frames + frames) * 16000 / 16]
    reference: np.ndarray  # uint8 [H, W, 3]
    reference_source: str  # "frame 123" or the image path
    audio_padded: tuple[int, int]  # zero samples added before / after where the audio did not reach

    @property
    def motion(self) -> np.ndarray:
        return self.frames[: self.window.motion_frames]

    @property
    def new_frames(self) -> np.ndarray:
        return self.frames[self.window.motion_frames:]


def load_reference_image(path: Path, crop: CropPlan) -> np.ndarray:
    """A still image (png, jpg, webp...) read with PyAV and brought to the clip's bucket."""
    from engine.data.windows import Bucket, crop_for

    frames = media.decode_frames(path, [0.0])  # image files open as one-frame videos
    h, w = frames.shape[1:3]
    # Same bucket as the clip; the image may have another size, so its own cover-and-centre-crop.
    plan = crop_for(w, h, Bucket(crop.width, crop.height), "center", random.Random(0))
    return media.decode_frames(path, [0.0], plan)[0]


def load_window(clip: ClipSource, window: Window, crop: CropPlan, reference_frame: int = 0, *,
                allow_silent_audio: bool = False, fps: int = MODEL_FPS) -> WindowSample:
    """Decode one window. Without audio it raises (naming the file) unless silent audio is allowed."""
    times = window.frame_times_s(fps)
    frames = media.decode_frames(clip.video, times, crop)
    if clip.reference_image is not None:
        reference = load_reference_image(clip.reference_image, crop)
        ref_source = str(clip.reference_image)
    else:
        reference = media.decode_frames(clip.video, [reference_frame / fps], crop)[0]
        ref_source = f"frame {reference_frame}"
    start_s, end_s = window.audio_span_s(fps)
    n_samples = round((end_s - start_s) * media.MODEL_AUDIO_RATE)
    try:
        audio = media.decode_audio(clip.audio_path, start_s, end_s - start_s)
        samples, padded = audio.samples, (audio.missing_before, audio.missing_after)
    except DataError as exc:
        if not (allow_silent_audio and exc.problem.code == "no-audio-stream"):
            raise
        log.debug("%s: no audio, window trains with zero audio", clip.video)
        samples, padded = np.zeros(n_samples, np.float32), (n_samples, 0)
    if samples.size != n_samples:  # decode_audio guarantees this; a mismatch would misalign every frame
        raise DataError(make_problem("corrupt-container", clip.audio_path,
                                     f"audio window has {samples.size} samples, expected {n_samples}"))
    return WindowSample(clip=clip, window=window, frames=frames, audio=samples, reference=reference,
                        reference_source=ref_source, audio_padded=padded)
