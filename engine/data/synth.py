"""Synthetic talking clips for tests and the demo: a face whose mouth opens with a speech-like track.

Speech comes from espeak-ng when it is on PATH, otherwise from voiced bursts synthesised with numpy
(harmonics of a gliding pitch shaped by two formants, with word and phrase pauses), so tests never depend
on it. Videos are written with PyAV only. Frames can carry their own index as a 16-bit block code so that
tests can tell which source frame the decoder picked.
"""
from __future__ import annotations

import io
import logging
import shutil
import subprocess
import wave
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CAPTION = "A person looks into the camera and talks calmly, plain background, soft light."


# ---------------------------------------------------------------------------------------------------------
# Audio


def speech_like_audio(duration_s: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Voiced syllables separated by short and long pauses; float32 mono, peak 0.5."""
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * rate))
    out = np.zeros(n, dtype=np.float64)
    t = rng.uniform(0.05, 0.2)
    while t < duration_s:
        syl = rng.uniform(0.09, 0.26)
        i0, i1 = int(t * rate), min(n, int((t + syl) * rate))
        if i1 - i0 > 8:
            tt = np.arange(i1 - i0) / rate
            f0 = rng.uniform(95, 210) * (1 + rng.uniform(-0.15, 0.15) * tt / syl)
            phase = 2 * np.pi * np.cumsum(f0) / rate
            f1, f2 = rng.uniform(350, 900), rng.uniform(1000, 2600)
            voice = np.zeros_like(tt)
            for h in range(1, 25):
                fh = f0 * h
                # Two resonances (formants) give the vowel-like colour wav2vec2 features respond to.
                gain = 1 / (1 + ((fh - f1) / 150) ** 2) + 0.5 / (1 + ((fh - f2) / 250) ** 2) + 0.02
                voice += gain * np.sin(h * phase) * (fh < rate / 2)
            env = np.sin(np.pi * np.arange(i1 - i0) / (i1 - i0)) ** 0.6
            out[i0:i1] += voice * env * rng.uniform(0.5, 1.0)
            # A short noise burst before some syllables stands in for consonants.
            if rng.random() < 0.5 and i0 > 400:
                out[i0 - 400:i0] += rng.normal(0, 0.15, 400) * np.hanning(400)
        gap = rng.choice([rng.uniform(0.02, 0.08), rng.uniform(0.12, 0.3), rng.uniform(0.35, 0.6)],
                         p=[0.65, 0.28, 0.07])
        t += syl + gap
    peak = np.max(np.abs(out)) or 1.0
    return (0.5 * out / peak).astype(np.float32)


def _resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    if src_rate == dst_rate:
        return audio.astype(np.float32)
    frame = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None, :], format="fltp", layout="mono")
    frame.sample_rate = src_rate
    frame.pts = 0
    frame.time_base = Fraction(1, src_rate)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=dst_rate)
    parts = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame) + resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32)


def espeak_audio(text: str, rate: int = 16000, words_per_minute: int = 165) -> np.ndarray | None:
    """Speech of `text` from espeak-ng, or None when espeak-ng is not installed or fails."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    try:
        wav = subprocess.run([exe, "--stdout", "-s", str(words_per_minute), text], capture_output=True,
                             check=True, timeout=30).stdout
        with wave.open(io.BytesIO(wav)) as w:
            src_rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    except (OSError, subprocess.SubprocessError, wave.Error, EOFError) as exc:
        log.warning("espeak-ng failed (%s); using synthesised speech", exc)
        return None
    return _resample(pcm.astype(np.float32) / 32768.0, src_rate, rate)


def speech_audio(duration_s: float, rate: int = 16000, seed: int = 0, text: str | None = None,
                 use_espeak: bool = True) -> np.ndarray:
    """`duration_s` of speech: espeak-ng reading `text` (repeated with pauses) if possible, else synthetic."""
    n = int(round(duration_s * rate))
    spoken = espeak_audio(text or DEFAULT_CAPTION, rate) if use_espeak else None
    if spoken is None or spoken.size == 0:
        return speech_like_audio(duration_s, rate, seed)
    pause = np.zeros(int(0.4 * rate), dtype=np.float32)
    reps = int(np.ceil(n / (spoken.size + pause.size))) + 1
    track = np.concatenate([np.concatenate([spoken, pause]) for _ in range(reps)])[:n]
    peak = np.max(np.abs(track)) or 1.0
    return (0.5 * track / peak).astype(np.float32)


def mouth_openness(audio: np.ndarray, rate: int, frame_times_s: np.ndarray) -> np.ndarray:
    """Per video frame, the audio envelope around its time mapped to [0, 1] (0 = closed mouth)."""
    half = int(0.03 * rate)
    env = np.zeros(len(frame_times_s))
    for i, t in enumerate(frame_times_s):
        c = int(t * rate)
        seg = audio[max(0, c - half):c + half]
        env[i] = np.sqrt(np.mean(seg.astype(np.float64) ** 2)) if seg.size else 0.0
    top = np.percentile(env, 95) if env.size else 0.0
    return np.clip(env / top, 0.0, 1.0) if top > 0 else env


# ---------------------------------------------------------------------------------------------------------
# Pictures

INDEX_BITS = 16


def _index_block(width: int, height: int) -> tuple[int, int]:
    return max(1, width // (INDEX_BITS // 2)), max(2, height // 12)


def stamp_frame_index(img: np.ndarray, index: int) -> None:
    """Write `index` as 16 black/white blocks (two rows of 8) along the top edge, in place."""
    h, w = img.shape[:2]
    bw, bh = _index_block(w, h)
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, INDEX_BITS // 2)
        img[row * bh:(row + 1) * bh, col * bw:(col + 1) * bw] = 255 if (index >> bit) & 1 else 0


def read_frame_index(img: np.ndarray) -> int:
    """Read back the index written by stamp_frame_index (survives lossy compression: block centres)."""
    h, w = img.shape[:2]
    bw, bh = _index_block(w, h)
    value = 0
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, INDEX_BITS // 2)
        block = img[row * bh:(row + 1) * bh, col * bw:(col + 1) * bw]
        core = block[bh // 4:bh - bh // 4 or None, bw // 4:bw - bw // 4 or None]
        if core.mean() > 127:
            value |= 1 << bit
    return value


def render_faces(openness: np.ndarray, width: int, height: int, seed: int = 0,
                 stamp_index: bool = False) -> np.ndarray:
    """uint8 [N, H, W, 3]: a face on a plain background, mouth height following `openness`."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(40, 200, 3)
    skin = np.array([rng.integers(150, 235), rng.integers(110, 180), rng.integers(90, 150)])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width / 2 + rng.uniform(-0.05, 0.05) * width, height * 0.55
    rx, ry = width * 0.22, height * 0.36
    face = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    eyes = np.zeros_like(face)
    for ex in (cx - rx * 0.4, cx + rx * 0.4):
        eyes |= ((xx - ex) / (rx * 0.15)) ** 2 + ((yy - (cy - ry * 0.3)) / (ry * 0.08)) ** 2 <= 1
    base = np.empty((height, width, 3), np.uint8)
    base[:] = bg
    base[face] = skin
    base[eyes] = (30, 30, 30)
    frames = np.empty((len(openness), height, width, 3), np.uint8)
    my, mrx = cy + ry * 0.45, rx * 0.45
    for i, o in enumerate(openness):
        img = base.copy()
        mry = max(0.6, ry * (0.03 + 0.22 * float(o)))
        mouth = ((xx - cx) / mrx) ** 2 + ((yy - my) / mry) ** 2 <= 1
        img[mouth] = (90, 20, 30)
        if stamp_index:
            stamp_frame_index(img, i)
        frames[i] = img
    return frames


# ---------------------------------------------------------------------------------------------------------
# Files


def write_audio_file(path: Path, audio: np.ndarray, rate: int, codec: str = "pcm_s16le") -> Path:
    """Write a mono audio-only file (wav with PCM by default; m4a with aac, flac, mp3 with libmp3lame)."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        _encode_audio(container, stream, audio, rate, 0)
    return path


def _encode_audio(container, stream, audio: np.ndarray, rate: int, start_s: float) -> None:
    fmt = stream.codec_context.codec.audio_formats[0].name if stream.codec_context.codec.audio_formats else "s16"
    chunk = stream.codec_context.frame_size or 1024
    offset = int(round(start_s * rate))
    for s in range(0, audio.size, chunk):
        part = audio[s:s + chunk].astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(part, format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = offset + s
        frame.time_base = Fraction(1, rate)
        if fmt != "fltp":
            frame = _convert(frame, fmt, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def _convert(frame: av.AudioFrame, fmt: str, rate: int) -> av.AudioFrame:
    resampler = av.AudioResampler(format=fmt, layout="mono", rate=rate)
    out = resampler.resample(frame)
    return out[0]


def write_video(path: Path, frames: np.ndarray, fps: float, *, codec: str = "h264",
                frame_times_s: np.ndarray | None = None, audio: np.ndarray | None = None,
                audio_rate: int = 16000, audio_codec: str = "aac", audio_start_s: float = 0.0,
                display_rotation: int = 0) -> Path:
    """Encode frames (uint8 [N, H, W, 3]) and optional mono audio into one container with PyAV.

    With `frame_times_s`, frames get those presentation times (variable frame rate) in a 1 ms time base.
    `display_rotation` (degrees counter-clockwise) stores the frames sideways plus a display matrix, as
    phones do for portrait video.
    """
    path = Path(path)
    with av.open(str(path), "w") as container:
        rate = Fraction(fps).limit_denominator(1001)
        vs = container.add_stream(codec, rate=rate)
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv420p"
        if codec in ("h264", "libx264"):
            vs.options = {"preset": "ultrafast", "crf": "18"}
        else:
            vs.bit_rate = 2_000_000
        if frame_times_s is not None:
            vs.codec_context.time_base = Fraction(1, 1000)
        if display_rotation:
            vs.set_display_rotation(display_rotation)
        a_stream = None
        if audio is not None:
            a_stream = container.add_stream(audio_codec, rate=audio_rate)
            a_stream.layout = "mono"
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = int(round(frame_times_s[i] * 1000)) if frame_times_s is not None else i
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode(None):
            container.mux(packet)
        if a_stream is not None:
            _encode_audio(container, a_stream, audio, audio_rate, audio_start_s)
    return path


@dataclass(frozen=True)
class SynthClip:
    video: Path
    caption: Path | None
    audio: Path | None  # separate audio file, None when the audio is inside the video (or absent)
    fps: float
    width: int
    height: int
    duration_s: float
    audio_rate: int


AUDIO_MODES = ("aac", "pcm", "wav", "none")


def make_talking_clip(folder: Path, stem: str = "clip", *, fps: float = 25, size: tuple[int, int] = (64, 48),
                      duration_s: float = 5.5, codec: str = "h264", audio: str = "aac",
                      audio_rate: int = 16000, audio_duration_s: float | None = None,
                      audio_dir: Path | None = None, container: str | None = None,
                      caption: str | None = DEFAULT_CAPTION, seed: int = 0, use_espeak: bool = True,
                      stamp_index: bool = False, click_at_s: float | None = None,
                      silent: bool = False, frame_times_s: np.ndarray | None = None,
                      display_rotation: int = 0) -> SynthClip:
    """Write one synthetic talking clip (and its caption / separate audio) into `folder`.

    audio: "aac" (mp4), "pcm" (PCM in mkv: exact samples, for alignment tests), "wav" (the video has no
    audio; `<stem>.wav` goes to `audio_dir`) or "none". `click_at_s` replaces speech with silence plus one
    full-scale click at that time; `silent` gives an all-zero track.
    """
    if audio not in AUDIO_MODES:
        raise ValueError(f"audio={audio!r}: choose one of {', '.join(AUDIO_MODES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    if frame_times_s is None:
        frame_times = np.arange(int(round(duration_s * fps))) / fps
    else:
        frame_times = np.asarray(frame_times_s, dtype=np.float64)
    a_dur = duration_s if audio_duration_s is None else audio_duration_s
    if silent or click_at_s is not None:
        track = np.zeros(int(round(a_dur * audio_rate)), np.float32)
        if click_at_s is not None:
            k = int(round(click_at_s * audio_rate))
            track[k:k + 2] = 0.9  # two samples: survives any resampler as one clear peak
    else:
        track = speech_audio(a_dur, audio_rate, seed, caption, use_espeak)
    frames = render_faces(mouth_openness(track, audio_rate, frame_times), width, height, seed, stamp_index)
    ext = container or {"aac": "mp4", "pcm": "mkv"}.get(audio, "mp4")
    video = folder / f"{stem}.{ext}"
    embedded = audio in ("aac", "pcm")
    write_video(video, frames, fps, codec=codec, frame_times_s=frame_times_s,
                audio=track if embedded else None, audio_rate=audio_rate,
                audio_codec="aac" if audio == "aac" else "pcm_s16le", display_rotation=display_rotation)
    audio_path = None
    if audio == "wav":
        adir = Path(audio_dir) if audio_dir is not None else folder
        adir.mkdir(parents=True, exist_ok=True)
        audio_path = write_audio_file(adir / f"{stem}.wav", track, audio_rate)
    caption_path = None
    if caption is not None:
        caption_path = folder / f"{stem}.txt"
        caption_path.write_text(caption + "\n", encoding="utf-8")
    return SynthClip(video=video, caption=caption_path, audio=audio_path, fps=fps, width=width,
                     height=height, duration_s=float(len(frame_times) / fps if frame_times_s is None
                                                     else duration_s), audio_rate=audio_rate)


def make_talking_dataset(folder: Path, count: int, *, seed: int = 0, **kwargs) -> list[SynthClip]:
    """`count` clips named clip_000, clip_001, ... with different faces and speech."""
    return [make_talking_clip(folder, f"clip_{i:03d}", seed=seed + i, **kwargs) for i in range(count)]
