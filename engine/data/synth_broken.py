"""Deliberately broken dataset inputs, one maker per doctor problem code (see problems.KINDS).

Each maker builds a small dataset folder under `root` that shows exactly its problem (plus, where it
helps, a good clip next to it) and returns a BrokenCase naming the folder to check, the file the problem
must name, and the extra check options the case needs. Tests and the demo use them; nothing else should.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from engine.data import synth

# Small, fast media: 64x48 at 25 fps, just over one 80-frame window at 16 fps.
GOOD_CLIP = {"size": (64, 48), "duration_s": 5.5, "fps": 25, "use_espeak": False}
# Check options every case runs with: the 64x48 test clips must not count as tiny.
BASE_ARGS = ("--min-side", "40")


@dataclass(frozen=True)
class BrokenCase:
    code: str
    dataset: Path
    path: Path  # the file the problem must be reported on
    args: tuple[str, ...] = BASE_ARGS
    on_file_read: Callable[[Path], None] | None = field(default=None, compare=False)


def good_clip(folder: Path, stem: str = "good", **kwargs) -> synth.SynthClip:
    return synth.make_talking_clip(folder, stem, **{**GOOD_CLIP, **kwargs})


def _ds(root: Path) -> Path:
    d = root / "dataset"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _caption(video: Path) -> None:
    video.with_suffix(".txt").write_text(synth.DEFAULT_CAPTION, encoding="utf-8")


def dataset_empty(root: Path) -> BrokenCase:
    d = _ds(root)
    (d / "notes.txt").write_text("no videos here\n", encoding="utf-8")
    return BrokenCase("dataset-empty", d, d)


def zero_length_file(root: Path) -> BrokenCase:
    d = _ds(root)
    good_clip(d)
    bad = d / "empty.mp4"
    bad.write_bytes(b"")
    _caption(bad)
    return BrokenCase("zero-length-file", d, bad)


def corrupt_container(root: Path) -> BrokenCase:
    """A copy cut short: the mp4's index (moov, written last) is missing."""
    d = _ds(root)
    clip = good_clip(d, "cut")
    data = clip.video.read_bytes()
    clip.video.write_bytes(data[: len(data) * 2 // 5])
    return BrokenCase("corrupt-container", d, clip.video)


def unsupported_codec(root: Path) -> BrokenCase:
    """A Matroska file whose video codec id no decoder knows (same length, so the file stays valid)."""
    d = _ds(root)
    clip = good_clip(d, "odd", audio="pcm")
    data = clip.video.read_bytes()
    assert b"V_MPEG4/ISO/AVC" in data
    clip.video.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/AVC"))
    return BrokenCase("unsupported-codec", d, clip.video)


def no_video_stream(root: Path) -> BrokenCase:
    d = _ds(root)
    bad = d / "voice.mp4"
    synth.write_audio_file(bad, synth.speech_like_audio(5.5), 16000, codec="aac")
    _caption(bad)
    return BrokenCase("no-video-stream", d, bad)


def no_audio_stream(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "mute", audio="none")
    return BrokenCase("no-audio-stream", d, clip.video)


def duration_mismatch(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "short_audio", audio="pcm", duration_s=8.0, audio_duration_s=6.0)
    return BrokenCase("duration-mismatch", d, clip.video)


def variable_frame_rate(root: Path) -> BrokenCase:
    """A phone-like stream: frame intervals jump between 30 and 50 ms."""
    d = _ds(root)
    rng = np.random.default_rng(3)
    times = np.concatenate([[0.0], np.cumsum(rng.choice([0.03, 0.05], size=160))])
    times = times[times < 5.6]
    clip = good_clip(d, "vfr", audio="pcm", container="mkv", frame_times_s=times, duration_s=5.6)
    return BrokenCase("variable-frame-rate", d, clip.video)


def too_few_frames(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "short", duration_s=3.0)
    return BrokenCase("too-few-frames", d, clip.video)


def tiny_resolution(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "tiny", size=(32, 24))
    return BrokenCase("tiny-resolution", d, clip.video)


def extreme_aspect_ratio(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "banner", size=(192, 48))
    return BrokenCase("extreme-aspect-ratio", d, clip.video)


def caption_missing(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "nocap", caption=None)
    return BrokenCase("caption-missing", d, clip.video)


def caption_default(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "nocap", caption=None)
    return BrokenCase("caption-default", d, clip.video, args=(*BASE_ARGS, "--default-caption", "a person talking"))


def caption_empty(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "blank", caption="")
    return BrokenCase("caption-empty", d, clip.caption)


def caption_undecodable(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "latin")
    clip.caption.write_bytes("Un caf\u00e9 tr\u00e8s calme".encode("latin-1"))
    return BrokenCase("caption-undecodable", d, clip.caption)


def caption_too_long(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "essay", caption=" ".join(["the speaker keeps talking about the weather"] * 120))
    return BrokenCase("caption-too-long", d, clip.caption)


def duplicate_stem(root: Path) -> BrokenCase:
    d = _ds(root)
    good_clip(d, "take", audio="pcm", container="mkv")
    clip = good_clip(d, "take")  # take.mp4 next to take.mkv: which one does take.txt describe?
    return BrokenCase("duplicate-stem", d, clip.video)


def audio_missing(root: Path) -> BrokenCase:
    d = _ds(root)
    audio = root / "audio"
    good_clip(d, "paired", audio="wav", audio_dir=audio)
    clip = good_clip(d, "lonely", audio="none")
    return BrokenCase("audio-missing", d, clip.video, BASE_ARGS + ("--audio-dir", str(audio)))


def audio_ambiguous(root: Path) -> BrokenCase:
    d = _ds(root)
    audio = root / "audio"
    clip = good_clip(d, "twice", audio="wav", audio_dir=audio)
    synth.write_audio_file(audio / "twice.flac", synth.speech_like_audio(5.5), 16000, codec="flac")
    return BrokenCase("audio-ambiguous", d, clip.video, BASE_ARGS + ("--audio-dir", str(audio)))


def symlink_loop(root: Path) -> BrokenCase:
    """A folder link pointing at its own parent: followed blindly, the walk would never end."""
    d = _ds(root)
    good_clip(d)
    sub = d / "more"
    sub.mkdir()
    link = sub / "again"
    os.symlink("..", link)
    return BrokenCase("symlink-loop", d, link)


def broken_symlink(root: Path) -> BrokenCase:
    d = _ds(root)
    good_clip(d)
    link = d / "moved.mp4"
    os.symlink(root / "elsewhere" / "moved.mp4", link)
    return BrokenCase("broken-symlink", d, link)


def file_changed(root: Path) -> BrokenCase:
    """The doctor's hook appends to the clip after reading it, as a copy still in progress would."""
    d = _ds(root)
    clip = good_clip(d, "growing")

    def grow(path: Path) -> None:
        if path == clip.video:
            with open(path, "ab") as f:
                f.write(b"\0" * 1024)

    return BrokenCase("file-changed", d, clip.video, on_file_read=grow)


def mostly_silent(root: Path) -> BrokenCase:
    d = _ds(root)
    clip = good_clip(d, "quiet", silent=True)
    return BrokenCase("mostly-silent", d, clip.video)


def metadata_invalid(root: Path) -> BrokenCase:
    d = _ds(root)
    good_clip(d)
    meta = d / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "good.mp4", "caption": "fine"}) + "\n{file_name: broken\n",
                    encoding="utf-8")
    return BrokenCase("metadata-invalid", d, meta)


def missing_file(root: Path) -> BrokenCase:
    d = _ds(root)
    good_clip(d)
    meta = d / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "good.mp4", "caption": "fine",
                                "reference_image": "refs/face.png"}) + "\n", encoding="utf-8")
    return BrokenCase("missing-file", d, meta)


MAKERS: dict[str, Callable[[Path], BrokenCase]] = {
    "dataset-empty": dataset_empty,
    "zero-length-file": zero_length_file,
    "corrupt-container": corrupt_container,
    "unsupported-codec": unsupported_codec,
    "no-video-stream": no_video_stream,
    "no-audio-stream": no_audio_stream,
    "duration-mismatch": duration_mismatch,
    "variable-frame-rate": variable_frame_rate,
    "too-few-frames": too_few_frames,
    "tiny-resolution": tiny_resolution,
    "extreme-aspect-ratio": extreme_aspect_ratio,
    "caption-missing": caption_missing,
    "caption-default": caption_default,
    "caption-empty": caption_empty,
    "caption-undecodable": caption_undecodable,
    "caption-too-long": caption_too_long,
    "duplicate-stem": duplicate_stem,
    "audio-missing": audio_missing,
    "audio-ambiguous": audio_ambiguous,
    "symlink-loop": symlink_loop,
    "broken-symlink": broken_symlink,
    "file-changed": file_changed,
    "mostly-silent": mostly_silent,
    "metadata-invalid": metadata_invalid,
    "missing-file": missing_file,
}


def make_broken(code: str, root: Path) -> BrokenCase:
    """Build the case for `code` under `root` (a fresh folder)."""
    if code not in MAKERS:
        raise KeyError(f"no broken-input maker for {code!r}; known: {', '.join(sorted(MAKERS))}")
    return MAKERS[code](Path(root))
