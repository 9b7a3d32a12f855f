"""Reading clips with PyAV: header probes, packet timing, frames by timestamp, audio at 16 kHz mono.

Time convention used everywhere in engine.data: time 0 is the presentation time of the video's first
frame. Embedded audio is placed on the same container timeline (its own pts), so an audio track that starts
late or early stays aligned; a separate audio file starts at time 0 with the video.

Frame choice: the model's frame k (16 fps) shows the source frame that is on screen at t = k/16, i.e. the
last source frame whose timestamp is <= t. That is what a player shows, it works for any source rate,
including variable ones, and it never invents frames. No ffmpeg subprocess: everything goes through av.
"""
from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from engine.data.problems import DataError, make_problem
from engine.data.windows import CropPlan

MODEL_AUDIO_RATE = 16000
# Timestamps in containers are rounded to their time base (1 ms in Matroska); this absorbs that rounding
# when we compare a frame's time with a target time.
TIME_EPS = 1e-4
# Audio is decoded from the start of the file unless the window starts later than this: decoding a minute
# of audio costs milliseconds, and it keeps the sample count exact.
SEEK_AUDIO_AFTER_S = 60.0


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    width: int
    height: int
    rate: float | None  # the container's nominal frame rate, None when it does not say
    start_s: float
    duration_s: float | None  # from the header; None when the container does not store it


@dataclass(frozen=True)
class AudioInfo:
    codec: str
    sample_rate: int
    channels: int
    start_s: float
    duration_s: float | None


@dataclass(frozen=True)
class MediaInfo:
    path: Path
    format_name: str
    duration_s: float | None
    video: VideoInfo | None
    audio: AudioInfo | None


def _open(path: Path) -> av.container.InputContainer:
    """Open read-only, turning every failure into a DataError that names the file and the fix."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(make_problem("symlink-loop", path, f"cannot open: {exc.strerror}")) from exc
        raise DataError(make_problem("broken-symlink" if os.path.islink(path) else "missing-file", path,
                                     f"cannot open: {exc.strerror}")) from exc
    if size == 0:
        raise DataError(make_problem("zero-length-file", path))
    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise DataError(make_problem("corrupt-container", path, f"PyAV cannot read it: {exc}")) from exc


def require_decoder(stream, path: Path):
    """The stream's codec context; PyAV gives none when FFmpeg has no decoder for the codec."""
    if stream.codec_context is None:
        raise DataError(make_problem("unsupported-codec", path,
                                     f"the {stream.type} codec is unknown to this build of PyAV/FFmpeg"))
    return stream.codec_context


def _seconds(value: int | None, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def probe(path: Path | str) -> MediaInfo:
    """Read the headers only (no decode). Raises DataError for unreadable files or undecodable streams."""
    path = Path(path)
    with _open(path) as container:
        video = audio = None
        if container.streams.video:
            vs = container.streams.video[0]
            ctx = require_decoder(vs, path)
            rate = vs.average_rate or vs.guessed_rate or vs.base_rate
            video = VideoInfo(codec=ctx.name, width=ctx.width, height=ctx.height,
                              rate=float(rate) if rate else None,
                              start_s=_seconds(vs.start_time, vs.time_base) or 0.0,
                              duration_s=_seconds(vs.duration, vs.time_base))
        if container.streams.audio:
            aus = container.streams.audio[0]
            ctx = require_decoder(aus, path)
            audio = AudioInfo(codec=ctx.name, sample_rate=ctx.sample_rate, channels=ctx.channels,
                              start_s=_seconds(aus.start_time, aus.time_base) or 0.0,
                              duration_s=_seconds(aus.duration, aus.time_base))
        duration = container.duration / av.time_base if container.duration else None
        return MediaInfo(path=path, format_name=container.format.name, duration_s=duration,
                         video=video, audio=audio)


def frames_at_rate(duration_s: float, fps: int) -> int:
    """How many frames at `fps` fit in a source of this duration: frame k exists when k/fps < duration."""
    return max(0, math.ceil(duration_s * fps - 1e-6))


def source_frame_indices(source_times: np.ndarray, target_times: np.ndarray) -> np.ndarray:
    """For each target time, the index of the source frame on screen then (last one with time <= target)."""
    idx = np.searchsorted(source_times, np.asarray(target_times) + TIME_EPS, side="right") - 1
    return np.clip(idx, 0, len(source_times) - 1)


# decode_frames takes the bucket's CropPlan itself; this name stays for callers written against it.
FrameTransform = CropPlan


def _to_rgb(frame: av.VideoFrame, crop: CropPlan | None) -> np.ndarray:
    rotation = getattr(frame, "rotation", 0) or 0
    if crop is None:
        img = frame.to_ndarray(format="rgb24")
    else:
        # Phone clips store portrait video as landscape plus a rotation: scale in stored orientation.
        rw, rh = (crop.resize_h, crop.resize_w) if rotation % 180 else (crop.resize_w,
                                                                                    crop.resize_h)
        img = frame.reformat(width=rw, height=rh, format="rgb24", interpolation="AREA").to_ndarray()
    if rotation % 360:
        # Display matrix rotation is counter-clockwise in degrees; np.rot90 turns counter-clockwise too.
        img = np.rot90(img, k=int(rotation // 90) % 4)
    if crop is not None:
        img = img[crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
    return np.ascontiguousarray(img)


def decode_frames(path: Path | str, times_s: np.ndarray | list[float],
                  crop: CropPlan | None = None) -> np.ndarray:
    """Decode the frames on screen at the given times (seconds, time 0 = first frame), sorted ascending.

    With `crop` (windows.crop_for), each frame is scaled to cover the bucket and cropped to it.
    Returns uint8 [N, H, W, 3]. A source frame chosen by several targets (a 12 fps source at 16 fps) is
    converted once and repeated; frames between targets are decoded but never converted.
    """
    path = Path(path)
    times = np.asarray(times_s, dtype=np.float64)
    if times.size == 0:
        raise ValueError("decode_frames needs at least one time")
    if np.any(np.diff(times) < 0):
        raise ValueError("decode_frames needs times in ascending order")
    out: list[np.ndarray | None] = [None] * times.size
    with _open(path) as container:
        if not container.streams.video:
            raise DataError(make_problem("no-video-stream", path))
        vs = container.streams.video[0]
        vs.thread_type = "AUTO"
        tb = float(vs.time_base)
        start = (vs.start_time or 0) * tb
        first_target = start + float(times[0])
        if first_target > start + 1.0:
            # Seek lands on the last keyframe at or before the offset; decoding forward from there is exact.
            container.seek(int((first_target - TIME_EPS) / tb), stream=vs, backward=True, any_frame=False)
        next_i = 0
        prev: av.VideoFrame | None = None
        prev_img: np.ndarray | None = None
        try:
            for frame in container.decode(vs):
                if frame.pts is None:
                    continue
                ft = frame.pts * tb - start
                while next_i < times.size and times[next_i] + TIME_EPS < ft:
                    if prev is None:  # target before the first decoded frame: show the first one
                        prev = frame
                    if prev_img is None:
                        prev_img = _to_rgb(prev, crop)
                    out[next_i] = prev_img
                    next_i += 1
                if next_i >= times.size:
                    break
                prev, prev_img = frame, None
        except av.error.FFmpegError as exc:
            raise DataError(make_problem("corrupt-container", path, f"decoding video failed: {exc}")) from exc
        if prev is None:
            raise DataError(make_problem("corrupt-container", path, "no video frame could be decoded"))
        while next_i < times.size:  # targets at or after the last frame show the last frame
            if prev_img is None:
                prev_img = _to_rgb(prev, crop)
            out[next_i] = prev_img
            next_i += 1
    return np.stack(out)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AudioWindow:
    samples: np.ndarray  # float32 mono at `rate`
    rate: int
    missing_before: int  # zero samples added where the window starts before the audio
    missing_after: int  # zero samples added where it runs past the end


def _mono_resampler(rate: int) -> av.AudioResampler:
    # libswresample compensates its filter delay: an impulse at t comes out at t (checked in the tests).
    return av.AudioResampler(format="flt", layout="mono", rate=rate)


def _resampled(resampler: av.AudioResampler, frame: av.AudioFrame | None) -> list[np.ndarray]:
    return [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]


def decode_audio(path: Path | str, start_s: float = 0.0, duration_s: float | None = None, *,
                 rate: int = MODEL_AUDIO_RATE) -> AudioWindow:
    """Audio of [start_s, start_s + duration_s) on the clip's timeline, mono float32 at `rate`.

    The window is exact to the sample: round(duration_s * rate) samples, zero-filled where the audio track
    does not cover it. For a file with video, time 0 is the first video frame; for an audio-only file, its
    first sample. Channels are averaged (downmix), resampling is band-limited (libswresample).
    """
    path = Path(path)
    margin = 0.25  # decode a little around the window so the resampler's edges fall outside it
    with _open(path) as container:
        if not container.streams.audio:
            raise DataError(make_problem("no-audio-stream", path))
        aus = container.streams.audio[0]
        require_decoder(aus, path)
        if container.streams.video:
            vs = container.streams.video[0]
            zero = (vs.start_time or 0) * float(vs.time_base)
        else:
            zero = (aus.start_time or 0) * float(aus.time_base)
        t0 = zero + start_s
        t1 = None if duration_s is None else t0 + duration_s
        if start_s > SEEK_AUDIO_AFTER_S:
            # Only for far windows: after a seek the first frame's pts may be rounded (1 ms in Matroska).
            container.seek(int((t0 - margin) / float(aus.time_base)), stream=aus, backward=True)
        resampler = _mono_resampler(rate)
        chunks: list[np.ndarray] = []
        base: float | None = None
        try:
            for frame in container.decode(aus):
                if frame.pts is None:
                    continue
                ft = float(frame.pts * frame.time_base)
                if t1 is not None and ft > t1 + margin:
                    break
                # Positions come from counting samples after the first frame, never from later frames'
                # pts, which containers round (1 ms in Matroska = 16 samples at 16 kHz).
                if base is None:
                    base = ft
                chunks.extend(_resampled(resampler, frame))
        except av.error.FFmpegError as exc:
            raise DataError(make_problem("corrupt-container", path, f"decoding audio failed: {exc}")) from exc
        chunks.extend(_resampled(resampler, None))
    decoded = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if base is None:
        base = t0
    offset = round((t0 - base) * rate)  # index in `decoded` of the window's first sample
    n = max(0, len(decoded) - offset) if duration_s is None else round(duration_s * rate)
    out = np.zeros(n, dtype=np.float32)
    src_lo, src_hi = max(offset, 0), min(offset + n, len(decoded))
    if src_hi > src_lo:
        out[src_lo - offset:src_hi - offset] = decoded[src_lo:src_hi]
    before = min(n, max(0, -offset))
    after = min(n, max(0, offset + n - len(decoded)))
    return AudioWindow(samples=out, rate=rate, missing_before=before, missing_after=after)
