"""One read through a file for the doctor: packet timestamps, the first video frame, audio loudness.

Opening a container and demuxing it costs more than the checks themselves, so everything the doctor needs
from a file comes from a single demux pass: every video packet's timestamp (exact frame rate, variable
rate, duration), one decoded video frame (display rotation, and proof the stream decodes) and, when
asked, the decoded audio reduced to 20 ms loudness blocks (the silence check). About 10 ms for 10 s of
480p H.264 with 48 kHz AAC on one core.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from engine.data.media import _open, require_decoder
from engine.data.problems import DataError, make_problem


@dataclass(frozen=True)
class StreamTiming:
    """Exact timing from packet timestamps."""

    video_times: np.ndarray  # sorted presentation times of every video frame, seconds, time 0 = first frame
    video_start_s: float  # container time of the first video frame
    video_duration_s: float  # first frame to the end of the last one
    audio_start_s: float | None  # container times of the audio track's extent, None without audio
    audio_end_s: float | None

    @property
    def audio_duration_s(self) -> float | None:
        if self.audio_start_s is None or self.audio_end_s is None:
            return None
        return self.audio_end_s - self.audio_start_s

    @property
    def frame_intervals(self) -> np.ndarray:
        return np.diff(self.video_times)

    @property
    def mean_fps(self) -> float | None:
        """Frames per second over the whole stream; exact for constant rates despite rounded timestamps."""
        span = float(self.video_times[-1]) if self.video_times.size > 1 else 0.0
        return (self.video_times.size - 1) / span if span > 0 else None

    def is_variable_rate(self, tolerance: float = 0.1) -> bool:
        """True when some frame interval differs from the typical one by more than `tolerance` (relative)."""
        d = self.frame_intervals
        if d.size < 2:
            return False
        med = float(np.median(d))
        # 1.5 ms absorbs timestamp rounding (Matroska stores milliseconds; 30 fps alternates 33/34 ms).
        slack = max(tolerance * med, 0.0015)
        return bool(np.any(np.abs(d - med) > slack))


@dataclass(frozen=True)
class MediaScan:
    timing: StreamTiming | None  # None for audio-only files
    rotation: int  # display rotation of the video in degrees (0 without video)
    audio_start_s: float | None  # extent of the first audio track on the container timeline
    audio_end_s: float | None
    levels_db: np.ndarray | None  # loudness of 20 ms audio blocks (dBFS); None when not asked or no audio


LEVEL_RATE_HZ = 8000  # loudness is measured on samples thinned to about this rate

# Sample formats as numpy reads their plane buffers, and the value of full scale.
_FORMATS = {"u8": (np.uint8, 128.0), "s16": (np.int16, 32768.0), "s32": (np.int32, 2147483648.0),
            "s64": (np.int64, 9223372036854775808.0), "flt": (np.float32, 1.0), "dbl": (np.float64, 1.0)}


def _planes(frame: av.AudioFrame) -> list[np.ndarray]:
    """The frame's samples per plane, read straight from its buffers (no copy, no per-frame vstack)."""
    fmt = frame.format
    dtype, _ = _FORMATS[fmt.name.rstrip("p")]
    per_plane = frame.samples if fmt.is_planar else frame.samples * len(frame.layout.channels)
    return [np.frombuffer(plane, dtype=dtype, count=per_plane) for plane in frame.planes]


def _power(chunks: list[list[np.ndarray]], fmt: av.AudioFormat, channels: int, step: int) -> np.ndarray:
    """Mean square over channels of every `step`-th sample, computed once for the whole track.

    A loudness threshold needs no more than ~8 kHz of samples; skipping the rest halves the check's cost.
    """
    _, full = _FORMATS[fmt.name.rstrip("p")]
    ch = max(channels, 1)
    if fmt.is_planar:
        planes = [np.concatenate([c[i] for c in chunks])[::step] for i in range(len(chunks[0]))]
    else:
        packed = np.concatenate([c[0] for c in chunks])
        planes = [packed[i::ch * step] for i in range(ch)]
    total = np.zeros(planes[0].size, dtype=np.float32)
    for x in planes:
        y = x.astype(np.float32)
        if fmt.name.startswith("u8"):
            y -= 128.0
        total += y * y
    return total / (len(planes) * full * full)


def _levels_db(power: np.ndarray, rate: float, block_s: float) -> np.ndarray:
    if power.size == 0:
        return np.zeros(0)
    block = min(max(1, int(block_s * rate)), power.size)
    nb = power.size // block
    rms = np.sqrt(np.mean(power[: nb * block].reshape(nb, block), axis=1))
    return 20.0 * np.log10(np.maximum(rms, 1e-10))


def scan_media(path: Path | str, *, audio_levels: bool = True, block_s: float = 0.02,
               max_audio_s: float | None = None) -> MediaScan:
    """Demux the first video and audio stream once; see the module docstring for what is collected."""
    path = Path(path)
    with _open(path) as container:
        vs = container.streams.video[0] if container.streams.video else None
        aus = container.streams.audio[0] if container.streams.audio else None
        for stream in (vs, aus):
            if stream is not None:
                require_decoder(stream, path)
                # One decoder thread: we decode a single video frame, and threaded decoders cost more to
                # start than that frame; the doctor runs files in parallel instead.
                stream.codec_context.thread_count = 1
        v_time_base = float(vs.time_base) if vs is not None else 0.0
        # Read while the container is open: after it closes, the stream's fields read freed memory (a one-frame
        # clip, the only one that needs this rate, came out 0.04 s long in one run and 9.7 s in the next).
        nominal_rate = float(vs.average_rate or vs.guessed_rate or 0) if vs is not None else 0.0
        a_time_base = float(aus.time_base) if aus is not None else 0.0
        channels = aus.codec_context.channels if aus is not None else 0
        decode_audio = audio_levels and aus is not None
        rate = aus.codec_context.sample_rate if aus is not None else 0
        audio_limit = None if max_audio_s is None or not rate else int(max_audio_s * rate)
        vpts: list[int] = []
        a_first = a_end = None  # in the audio stream's time base, converted once at the end
        rotation: int | None = None
        chunks: list[list[np.ndarray]] = []
        audio_fmt: av.AudioFormat | None = None
        audio_samples = 0
        try:
            # Per packet only integer bookkeeping: a 10 s clip has ~500 audio packets, and Fraction
            # arithmetic on each of them would cost more than decoding them.
            for packet in container.demux([s for s in (vs, aus) if s is not None]):
                ts = packet.pts if packet.pts is not None else packet.dts
                if packet.stream is vs:
                    if ts is not None:
                        vpts.append(ts)
                    if rotation is None:
                        for frame in packet.decode():
                            rotation = int(getattr(frame, "rotation", 0) or 0) % 360
                            break
                    continue
                if ts is not None:
                    a_first = ts if a_first is None else min(a_first, ts)
                    end = ts + (packet.duration or 0)
                    a_end = end if a_end is None else max(a_end, end)
                if decode_audio and (audio_limit is None or audio_samples < audio_limit):
                    for frame in packet.decode():
                        chunks.append(_planes(frame))
                        audio_fmt = frame.format
                        audio_samples += frame.samples
            if vs is not None and rotation is None:
                for frame in vs.codec_context.decode(None):  # frames the decoder was still holding
                    rotation = int(getattr(frame, "rotation", 0) or 0) % 360
                    break
        except av.error.FFmpegError as exc:
            raise DataError(make_problem("corrupt-container", path, f"reading the file failed: {exc}")) from exc
    timing = None
    if vs is not None:
        if not vpts or rotation is None:
            raise DataError(make_problem("corrupt-container", path, "no video frame could be decoded"))
        times = np.unique(np.asarray(vpts, dtype=np.int64)).astype(np.float64) * v_time_base
        rel = times - times[0]
        # The last frame lasts one mean interval (timestamps do not say how long it is shown); a lone frame
        # lasts one frame at the header's rate, or at the model's 16 fps when the header has none.
        step = float(rel[-1] / (rel.size - 1)) if rel.size > 1 else 1.0 / (nominal_rate or 16.0)
        timing = StreamTiming(video_times=rel, video_start_s=float(times[0]), video_duration_s=float(rel[-1] + step),
                              audio_start_s=None if a_first is None else a_first * a_time_base,
                              audio_end_s=None if a_end is None else a_end * a_time_base)
    levels = None
    if decode_audio:
        step = max(1, rate // LEVEL_RATE_HZ)
        power = _power(chunks, audio_fmt, channels, step) if chunks else np.zeros(0)
        levels = _levels_db(power, rate / step, block_s)
    a_start_s = None if a_first is None else a_first * a_time_base
    a_end_s = None if a_end is None else a_end * a_time_base
    return MediaScan(timing=timing, rotation=rotation or 0, audio_start_s=a_start_s, audio_end_s=a_end_s,
                     levels_db=levels)


def read_stream_timing(path: Path | str) -> StreamTiming:
    """Packet timing of a video file (no audio decode). Raises DataError when it has no video."""
    found = scan_media(path, audio_levels=False)
    if found.timing is None:
        raise DataError(make_problem("no-video-stream", path))
    return found.timing
