"""Frame arithmetic of S2V training: windows, motion frames, audio spans, reference frame, buckets.

All frame numbers count frames at the model's 16 fps from the clip's time 0 (see media.py), so frame k
is at k/16 s. Facts from spec/S2V_MODEL.md:
- one clip = 80 new frames = 20 latents; the 73 frames before it are the motion frames = 19 latents
  (the causal VAE maps 4k+1 frames to k+1 latents);
- the audio encoder sees motion frames + new frames (153 frames -> 39 causal steps, the first 19 dropped);
- wav2vec2 runs at 50 Hz, is interpolated to 30 fps, and video frame i takes 30 fps index round(i*30/16).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np

from engine.frames import MOTION_FRAMES, VAE_TIME_FACTOR, WINDOW_FRAMES, window_frame_problems

MODEL_FPS = 16
VAE_SPACE_FACTOR = 8
WAV2VEC_RATE_HZ = 50
AUDIO_FEATURE_FPS = 30  # the official pipeline's intermediate rate for wav2vec2 features


def frames_text(frames: int, seconds: float | None = None) -> str:
    """A length as every report writes it, e.g. '1 frame at 16 fps (0.04 s)': frames at the model's rate, then
    seconds; `seconds` is the source's own duration when known (frames / 16 otherwise)."""
    seconds = frames / MODEL_FPS if seconds is None else seconds
    return f"{frames} frame{'' if frames == 1 else 's'} at {MODEL_FPS} fps ({seconds:.2f} s)"


def latent_frames(pixel_frames: int) -> int:
    """Latent frames the causal VAE makes from `pixel_frames` (first frame alone, then groups of 4)."""
    if pixel_frames <= 0:
        return 0
    return 1 + (pixel_frames - 1) // VAE_TIME_FACTOR


@dataclass(frozen=True)
class WindowSettings:
    frames: int = WINDOW_FRAMES  # new frames per window (multiple of 4: 4 frames per latent)
    motion_frames: int = MOTION_FRAMES  # 4k+1 frames of history encoded on their own
    stride: int = WINDOW_FRAMES  # frames between window starts
    max_windows: int | None = None  # per clip; None = as many as fit

    def __post_init__(self) -> None:
        problems = window_frame_problems(self.frames, self.motion_frames)
        if problems:
            which, message, fix = problems[0]
            raise ValueError(f"window {which.replace('_', ' ')} = {getattr(self, which)}: {message}; {fix}")
        if self.stride <= 0:
            raise ValueError(f"window stride = {self.stride}: must be at least 1 frame")
        if self.max_windows is not None and self.max_windows <= 0:
            raise ValueError(f"max windows = {self.max_windows}: must be at least 1 (or unset)")


@dataclass(frozen=True)
class Window:
    """One training sample's span of a clip. `motion_frames` is 0 when the clip lacks the history."""

    start: int
    frames: int = WINDOW_FRAMES
    motion_frames: int = 0

    @property
    def end(self) -> int:
        return self.start + self.frames

    @property
    def motion_start(self) -> int:
        return self.start - self.motion_frames

    @property
    def has_motion(self) -> bool:
        return self.motion_frames > 0

    @property
    def latents(self) -> int:
        return self.frames // VAE_TIME_FACTOR

    @property
    def motion_latents(self) -> int:
        return latent_frames(self.motion_frames)

    # The audio span covers the motion frames and the new frames, nothing more, nothing less.
    @property
    def audio_first_frame(self) -> int:
        return self.motion_start

    @property
    def audio_frames(self) -> int:
        return self.motion_frames + self.frames

    def audio_span_s(self, fps: int = MODEL_FPS) -> tuple[float, float]:
        return self.motion_start / fps, self.end / fps

    def frame_times_s(self, fps: int = MODEL_FPS, *, with_motion: bool = True) -> np.ndarray:
        first = self.motion_start if with_motion else self.start
        return np.arange(first, self.end, dtype=np.float64) / fps

    def to_dict(self) -> dict[str, int]:
        return {"start": self.start, "end": self.end, "frames": self.frames,
                "motion_frames": self.motion_frames, "latents": self.latents,
                "motion_latents": self.motion_latents}


def plan_windows(total_frames: int, settings: WindowSettings = WindowSettings()) -> list[Window]:
    """Windows of a clip with `total_frames` frames at 16 fps: starts 0, stride, 2*stride, ...

    A window takes motion frames only when all of them exist in the clip (start >= motion_frames);
    the first window of a clip is therefore a "first clip" sample, as in inference. With max_windows,
    the kept windows are spread evenly over the clip rather than taken from its start.
    """
    if total_frames < settings.frames:
        return []
    starts = list(range(0, total_frames - settings.frames + 1, settings.stride))
    if settings.max_windows is not None and len(starts) > settings.max_windows:
        pick = np.linspace(0, len(starts) - 1, settings.max_windows).round().astype(int)
        starts = [starts[i] for i in sorted(set(pick.tolist()))]
    return [Window(start=s, frames=settings.frames,
                   motion_frames=settings.motion_frames if s >= settings.motion_frames else 0)
            for s in starts]


REFERENCE_MODES = ("first", "random", "outside")


@dataclass(frozen=True)
class ReferenceChoice:
    frame: int
    mode: str  # the mode actually applied (outside falls back to random when nothing is outside)
    note: str = ""


def choose_reference_frame(window: Window, total_frames: int, mode: str = "first",
                           rng: random.Random | None = None) -> ReferenceChoice:
    """The frame used as the reference image: the clip's first, any, or one outside the window's span.

    'outside' avoids frames the model is asked to produce (or sees as motion) so that it cannot copy
    the answer from the reference; with no frame outside, it says so and falls back to 'random'.
    """
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference mode {mode!r}: choose one of {', '.join(REFERENCE_MODES)}")
    if total_frames <= 0:
        raise ValueError("choose_reference_frame needs a clip with at least one frame")
    rng = rng or random.Random(0)
    if mode == "first":
        return ReferenceChoice(0, "first")
    if mode == "random":
        return ReferenceChoice(rng.randrange(total_frames), "random")
    outside = [(0, window.motion_start), (window.end, total_frames)]
    sizes = [max(0, hi - lo) for lo, hi in outside]
    if sum(sizes) == 0:
        return ReferenceChoice(rng.randrange(total_frames), "random",
                               "no frame outside the window; a random frame of the clip is used")
    k = rng.randrange(sum(sizes))
    if k < sizes[0]:
        return ReferenceChoice(outside[0][0] + k, "outside")
    return ReferenceChoice(outside[1][0] + k - sizes[0], "outside")


# ---------------------------------------------------------------------------------------------------------
# Resolution buckets

SIDE_MULTIPLE = 16  # 8 (VAE) x 2 (patch): latent height and width stay even


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int
    frames: int | None = None  # set in fixed "WxH@F" mode

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}" + (f"@{self.frames}" if self.frames else "")


@dataclass(frozen=True)
class BucketSettings:
    max_area: int = 832 * 480
    multiple: int = SIDE_MULTIPLE
    max_aspect: float = 2.0  # widest (and tallest, inverted) bucket
    fixed: str | None = None  # "WxH@F" or "WxH": every clip goes to this one size

    def __post_init__(self) -> None:
        if self.multiple % SIDE_MULTIPLE:
            raise ValueError(f"bucket side multiple {self.multiple}: must be a multiple of {SIDE_MULTIPLE}")
        if self.max_area < self.multiple * self.multiple:
            raise ValueError(f"bucket max area {self.max_area} is smaller than one {self.multiple}px square")
        if self.fixed is not None:
            parse_fixed_bucket(self.fixed, self.multiple)


_FIXED = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\d+)\s*(?:@\s*(\d+))?\s*$")


def parse_fixed_bucket(text: str, multiple: int = SIDE_MULTIPLE) -> Bucket:
    """Parse "832x480@80" (width x height @ new frames per window); the frame part is optional."""
    m = _FIXED.match(text)
    if not m:
        raise ValueError(f"bucket {text!r}: expected WIDTHxHEIGHT or WIDTHxHEIGHT@FRAMES, e.g. 832x480@80")
    w, h = int(m.group(1)), int(m.group(2))
    f = int(m.group(3)) if m.group(3) else None
    if w % multiple or h % multiple or w <= 0 or h <= 0:
        raise ValueError(f"bucket {text!r}: width and height must be positive multiples of {multiple}")
    if f is not None and (f <= 0 or f % VAE_TIME_FACTOR):
        raise ValueError(f"bucket {text!r}: frames must be a positive multiple of 4 (80 is the model's)")
    return Bucket(w, h, f)


def aspect_buckets(settings: BucketSettings = BucketSettings()) -> list[Bucket]:
    """All sizes with sides multiple of `multiple`, area <= max_area, as large as possible per height."""
    if settings.fixed:
        return [parse_fixed_bucket(settings.fixed, settings.multiple)]
    m = settings.multiple
    found: dict[tuple[int, int], Bucket] = {}
    for h in range(m, settings.max_area // m + 1, m):
        w = (settings.max_area // h) // m * m
        if w < m:
            break
        if 1 / settings.max_aspect - 1e-9 <= w / h <= settings.max_aspect + 1e-9:
            found[(w, h)] = Bucket(w, h)
    return sorted(found.values(), key=lambda b: b.aspect)


def choose_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket closest in aspect ratio (log scale, so 2:1 and 1:2 are equally far from 1:1)."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - target), -b.width * b.height))


@dataclass(frozen=True)
class CropPlan:
    resize_w: int
    resize_h: int
    left: int
    top: int
    width: int
    height: int

    @property
    def kept_fraction(self) -> float:
        """Share of the (resized) source frame that survives the crop."""
        return (self.width * self.height) / (self.resize_w * self.resize_h)


CROP_MODES = ("center", "random")


def crop_for(width: int, height: int, bucket: Bucket, mode: str = "center",
             rng: random.Random | None = None) -> CropPlan:
    """Scale the source so it covers the bucket (no padding, aspect kept), then crop to the bucket."""
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r}: choose one of {', '.join(CROP_MODES)}")
    scale = max(bucket.width / width, bucket.height / height)
    rw = max(bucket.width, math.ceil(width * scale - 1e-6))
    rh = max(bucket.height, math.ceil(height * scale - 1e-6))
    if mode == "center":
        left, top = (rw - bucket.width) // 2, (rh - bucket.height) // 2
    else:
        rng = rng or random.Random(0)
        left, top = rng.randint(0, rw - bucket.width), rng.randint(0, rh - bucket.height)
    return CropPlan(rw, rh, left, top, bucket.width, bucket.height)


# ---------------------------------------------------------------------------------------------------------
# wav2vec2 features -> one vector per video frame


def audio_feature_frame_indices(first_frame: int, num_frames: int, feature_len_30fps: int,
                                fps: int = MODEL_FPS) -> np.ndarray:
    """30 fps feature index for each video frame, -1 where it lies beyond the audio (zero vector).

    The official pipeline samples times i/fps with numpy and rounds with np.round, which rounds halves
    to even (frame 4 -> 7.5 -> 8, frame 12 -> 22.5 -> 22); we do the same so features match bit for bit.
    """
    i = np.arange(first_frame, first_frame + num_frames, dtype=np.float64)
    idx = np.round(i / fps * AUDIO_FEATURE_FPS).astype(np.int64)
    idx[(idx >= feature_len_30fps) | (idx < 0)] = -1
    return idx


def audio_features_per_frame(hidden_states, first_frame: int, num_frames: int, fps: int = MODEL_FPS):
    """Map wav2vec2 hidden states [L, T_a, C] (50 Hz) to per-video-frame features [L, C, num_frames].

    `hidden_states` must start at the clip's time 0 (or at the audio span's first frame, with
    first_frame = 0). Steps, as spec section 4.1: linear interpolation with align_corners=True to
    int(T_a / 50 * 30) steps at 30 fps; frame i takes step round(i * 30 / 16); zeros beyond the audio.
    The output layout [L, C, N] is the model's per-sample `audio_input`.
    """
    import torch  # here, not at module level: the doctor uses this module and must stay torch-free
    import torch.nn.functional as F

    if hidden_states.dim() != 3:
        raise ValueError(f"hidden states must be [layers, time, channels], got {tuple(hidden_states.shape)}")
    layers, t_a, channels = hidden_states.shape
    len30 = int(t_a / float(WAV2VEC_RATE_HZ) * AUDIO_FEATURE_FPS)
    out = hidden_states.new_zeros((layers, channels, num_frames))
    if len30 <= 0:
        return out
    feats = F.interpolate(hidden_states.transpose(1, 2), size=len30, mode="linear", align_corners=True)
    idx = torch.from_numpy(audio_feature_frame_indices(first_frame, num_frames, len30, fps))
    valid = idx >= 0
    out[:, :, valid] = feats[:, :, idx[valid]]
    return out


WAV2VEC_CONV = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))  # (kernel, stride) per layer


def wav2vec_steps(num_samples: int) -> int:
    """wav2vec2's output length for `num_samples` at 16 kHz (its 7-layer conv front end, no padding)."""
    n = num_samples
    for kernel, stride in WAV2VEC_CONV:
        if n < kernel:
            return 0
        n = (n - kernel) // stride + 1
    return n
