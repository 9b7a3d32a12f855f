"""The dataset doctor: inspect every clip before any GPU work and say exactly what will happen to it.

For each clip the report gives the plan (windows, bucket and crop, fps conversion, reference frame, audio
source) and every problem with a stable code (problems.KINDS), a severity, the file and the fix. It reads
headers and packet timestamps, decodes one video frame (display rotation, and proof the stream decodes)
and the audio track for the silence check; nothing else is decoded. Files are only ever opened for reading.
Progress goes to a callback; the engine logs, it never prints.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import random
import threading
import time
import zlib
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from engine.data import media
from engine.data.caption_tokens import estimate_tokens
from engine.data.discover import ClipSource, DatasetSpec, discover
from engine.data.scan import MediaScan, scan_media
from engine.data.problems import BLOCKING, WARNING, DataError, Problem, make_problem
from engine.data.windows import (MODEL_FPS, BucketSettings, CropPlan, Window, WindowSettings, aspect_buckets,
                                 choose_bucket, choose_reference_frame, crop_for, frames_text, plan_windows)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, Path], None]  # (clips done, clips total, clip just finished)


@dataclass(frozen=True)
class DoctorSettings:
    windows: WindowSettings = field(default_factory=WindowSettings)
    buckets: BucketSettings = field(default_factory=BucketSettings)
    crop: str = "center"
    reference: str = "first"
    allow_silent_audio: bool = False  # clips without audio train with zero audio instead of blocking
    min_side: int = 256  # shorter side below this is too small to upscale into a bucket
    min_kept_fraction: float = 0.6  # warn when cropping to the bucket discards more than 40 %
    duration_tolerance_s: float = 0.25  # audio/video length difference tolerated (AAC priming is ~0.02-0.06)
    vfr_tolerance: float = 0.1  # relative frame-interval spread that counts as variable frame rate
    silence_db: float = -45.0  # 20 ms blocks quieter than this count as silent
    max_silent_fraction: float = 0.8
    silence_check_max_s: float | None = 300.0  # decode at most this much audio per clip for the check
    max_caption_tokens: int = 512
    count_tokens: Callable[[str], int] | None = None  # exact UMT5 count when a tokenizer is at hand
    workers: int | None = None  # threads; None = min(8, CPUs)
    seed: int = 0


@dataclass(frozen=True)
class ClipPlan:
    """What training will use from one clip."""

    width: int  # as displayed (after rotation)
    height: int
    rotation: int
    source_fps: float | None
    variable_rate: bool
    fps_conversion: str
    duration_s: float  # usable: where both video and audio exist
    frames: int  # at 16 fps in the usable duration
    windows: tuple[Window, ...]
    bucket: str
    crop: CropPlan
    reference: str
    audio_source: str

    @property
    def length(self) -> str:
        """The usable length as the problems and `s2v-tui check` write it (windows.frames_text)."""
        return frames_text(self.frames, self.duration_s)

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "rotation": self.rotation,
                "source_fps": self.source_fps, "variable_rate": self.variable_rate,
                "fps_conversion": self.fps_conversion, "duration_s": round(self.duration_s, 4),
                "frames_16fps": self.frames, "length": self.length, "windows": [w.to_dict() for w in self.windows],
                "bucket": self.bucket, "crop": vars(self.crop), "reference": self.reference,
                "audio_source": self.audio_source}


@dataclass(frozen=True)
class ClipReport:
    clip: ClipSource
    plan: ClipPlan | None
    problems: tuple[Problem, ...]

    @property
    def usable(self) -> bool:
        return self.plan is not None and bool(self.plan.windows) and not any(p.blocking for p in self.problems)

    def to_dict(self) -> dict:
        c = self.clip
        return {"video": str(c.video), "dataset": c.dataset, "usable": self.usable,
                "caption": c.caption, "caption_source": str(c.caption_source) if c.caption_source else None,
                "audio": str(c.audio_path), "reference_image": str(c.reference_image) if c.reference_image
                else None, "repeats": c.repeats, "weight": c.weight,
                "plan": self.plan.to_dict() if self.plan else None,
                "problems": [p.to_dict() for p in self.problems]}


@dataclass(frozen=True)
class DoctorReport:
    datasets: tuple[DatasetSpec, ...]
    clips: tuple[ClipReport, ...]
    problems: tuple[Problem, ...]  # not tied to one clip
    elapsed_s: float
    cancelled: bool = False

    @property
    def all_problems(self) -> list[Problem]:
        return list(self.problems) + [p for c in self.clips for p in c.problems]

    @property
    def blocking(self) -> list[Problem]:
        return [p for p in self.all_problems if p.severity == BLOCKING]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.all_problems if p.severity == WARNING]

    @property
    def windows(self) -> int:
        return sum(len(c.plan.windows) * c.clip.repeats for c in self.clips if c.usable and c.plan)

    def to_dict(self) -> dict:
        return {"datasets": [{"path": str(d.path), "audio_dir": str(d.audio_dir) if d.audio_dir else None,
                              "repeats": d.repeats, "weight": d.weight, "name": d.label} for d in self.datasets],
                "summary": {"clips": len(self.clips), "usable_clips": sum(c.usable for c in self.clips),
                            "windows_per_epoch": self.windows, "blocking": len(self.blocking),
                            "warnings": len(self.warnings), "elapsed_s": round(self.elapsed_s, 3),
                            "cancelled": self.cancelled},
                "problems": [p.to_dict() for p in self.problems],
                "clips": [c.to_dict() for c in self.clips]}


def _fingerprint(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _describe_fps(fps: float | None, vfr: bool) -> str:
    if fps is None:
        return "unknown source rate: frames picked by timestamp at 16 fps"
    if vfr:
        return f"variable rate (~{fps:.3f} fps) -> 16 fps, frames picked by timestamp"
    if abs(fps - MODEL_FPS) < 1e-3:
        return "16 fps source: used as is"
    verb = "drops" if fps > MODEL_FPS else "repeats"
    return f"{fps:.3f} fps -> 16 fps by timestamp ({verb} frames)"


def _silence_check(levels: np.ndarray | None, path: Path, settings: DoctorSettings) -> Problem | None:
    if levels is None:
        return None
    if levels.size == 0:
        return make_problem("mostly-silent", path, "the audio track holds no samples")
    silent = float(np.mean(levels < settings.silence_db))
    if silent > settings.max_silent_fraction:
        return make_problem("mostly-silent", path, f"{silent:.0%} of the audio is below {settings.silence_db:g} "
                            f"dBFS (loudest 20 ms: {levels.max():.1f} dBFS)")
    return None


@dataclass(frozen=True)
class _AudioFound:
    end_s: float | None  # end of the audio on the clip's timeline; None = no audio
    source: str
    path: Path
    levels_db: np.ndarray | None
    start_s: float = 0.0  # start of the audio on the clip's timeline (embedded tracks may start late)


def _audio_found(clip: ClipSource, video_scan: MediaScan, settings: DoctorSettings) -> _AudioFound:
    """Where the clip's audio comes from and how far it reaches (separate file or the video's track)."""
    timing = video_scan.timing
    if clip.audio is None:
        if video_scan.audio_end_s is None:
            return _AudioFound(None, "none", clip.video, None)
        return _AudioFound(video_scan.audio_end_s - timing.video_start_s, "embedded track -> 16 kHz mono",
                           clip.video, video_scan.levels_db, video_scan.audio_start_s - timing.video_start_s)
    if not clip.audio.is_file():
        return _AudioFound(None, "missing", clip.audio, None)  # discovery already reported the metadata row
    info = media.probe(clip.audio)
    if info.audio is None:
        raise DataError(make_problem("no-audio-stream", clip.audio, "the paired audio file has no audio"))
    found = scan_media(clip.audio, max_audio_s=settings.silence_check_max_s)
    # A separate file starts with the video; its length comes from its packets (headers of mp3 guess).
    end = (found.audio_end_s - found.audio_start_s) if found.audio_end_s is not None else info.duration_s
    return _AudioFound(end, f"{clip.audio.name}: {info.audio.codec} {info.audio.sample_rate} Hz "
                       f"x{info.audio.channels} -> 16 kHz mono", clip.audio, found.levels_db)


def inspect_clip(clip: ClipSource, settings: DoctorSettings = DoctorSettings(),
                 on_file_read: Callable[[Path], None] | None = None) -> ClipReport:
    """Check one clip and plan its windows. `on_file_read` runs after reading (tests change files there)."""
    problems = list(clip.problems)
    if settings.allow_silent_audio:
        problems = [replace(p, severity=WARNING, message=p.message + "; trains with zero audio")
                    if p.code == "audio-missing" else p for p in problems]
    watched = [clip.video] + ([clip.audio] if clip.audio is not None and clip.audio.is_file() else [])
    before = {p: _fingerprint(p) for p in watched}
    plan = None
    try:
        plan = _plan(clip, settings, problems)
    except DataError as exc:
        problems.append(exc.problem)
    if on_file_read is not None:
        on_file_read(clip.video)
    for p in watched:
        if _fingerprint(p) != before[p]:
            problems.append(make_problem("file-changed", p, "size or modification time changed during the check"))
    return ClipReport(clip=clip, plan=plan, problems=tuple(problems))


def _plan(clip: ClipSource, settings: DoctorSettings, problems: list[Problem]) -> ClipPlan | None:
    if clip.caption is not None:
        where = clip.caption_source or clip.video
        if not clip.caption.strip():
            problems.append(make_problem("caption-empty", where))
        else:
            counter = settings.count_tokens or estimate_tokens
            n = counter(clip.caption)
            if n > settings.max_caption_tokens:
                how = "" if settings.count_tokens else "about "
                problems.append(make_problem("caption-too-long", where, f"{how}{n} tokens, the text encoder "
                                             f"keeps {settings.max_caption_tokens}"))
    info = media.probe(clip.video)
    if info.video is None:
        raise DataError(make_problem("no-video-stream", clip.video,
                                     f"only {'audio' if info.audio else 'no'} streams in the file"))
    pairing_failed = any(p.code in ("audio-missing", "audio-ambiguous") for p in problems)
    scanned = scan_media(clip.video, audio_levels=clip.audio is None and not pairing_failed,
                         max_audio_s=settings.silence_check_max_s)
    timing, rotation = scanned.timing, scanned.rotation
    w, h = (info.video.height, info.video.width) if rotation % 180 else (info.video.width, info.video.height)

    if min(w, h) < settings.min_side:
        problems.append(make_problem("tiny-resolution", clip.video, f"{w}x{h}: shorter side below "
                                     f"{settings.min_side} px"))
    bucket = choose_bucket(w, h, aspect_buckets(settings.buckets))
    rng = random.Random(settings.seed ^ zlib.crc32(str(clip.video).encode()))
    crop = crop_for(w, h, bucket, settings.crop, rng)
    if crop.kept_fraction < settings.min_kept_fraction:
        problems.append(make_problem("extreme-aspect-ratio", clip.video, f"{w}x{h} (aspect {w / h:.2f}) goes to "
                                     f"bucket {bucket}: the crop keeps {crop.kept_fraction:.0%} of the frame"))

    fps = timing.mean_fps
    if fps and info.video.rate and abs(info.video.rate - fps) < 0.01 * fps:
        fps = info.video.rate  # the header's exact rate (30000/1001) when the timestamps agree with it
    elif fps is None:
        fps = info.video.rate  # one frame has no interval to measure: the header's rate is all there is
    vfr = timing.is_variable_rate(settings.vfr_tolerance)
    if vfr:
        d = timing.frame_intervals
        problems.append(make_problem("variable-frame-rate", clip.video, f"frame intervals from {d.min() * 1000:.1f} "
                                     f"to {d.max() * 1000:.1f} ms; frames are picked by timestamp at 16 fps"))

    duration = timing.video_duration_s
    if pairing_failed:
        audio = _AudioFound(None, "missing", clip.video, None)  # never fall back silently to the video's track
    else:
        try:
            audio = _audio_found(clip, scanned, settings)
        except DataError as exc:
            problems.append(exc.problem)
            audio = _AudioFound(None, "unreadable", clip.audio_path, None)
    audio_desc = audio.source
    if audio.end_s is None:
        if audio.source == "none":
            if settings.allow_silent_audio:
                problems.append(make_problem("no-audio-stream", clip.video, "no audio track; trains with zero "
                                             "audio (allowed)", severity=WARNING))
            else:
                problems.append(make_problem("no-audio-stream", clip.video))
        if settings.allow_silent_audio:
            audio_desc = "zero audio"
    else:
        if abs(audio.end_s - duration) > settings.duration_tolerance_s:
            video_len = frames_text(media.frames_at_rate(duration, MODEL_FPS), duration)
            audio_len = frames_text(media.frames_at_rate(audio.end_s, MODEL_FPS), audio.end_s)
            problems.append(make_problem("duration-mismatch", audio.path, f"video {video_len}, audio {audio_len}; "
                                         "windows only where both exist"))
        elif audio.start_s > settings.duration_tolerance_s:
            problems.append(make_problem("duration-mismatch", audio.path, f"the audio starts {audio.start_s:.2f} s "
                                         "after the first video frame; windows before that get silence"))
        duration = min(duration, audio.end_s)
        silent = _silence_check(audio.levels_db, audio.path, settings)
        if silent is not None:
            problems.append(silent)

    frames = media.frames_at_rate(duration, MODEL_FPS)
    windows = plan_windows(frames, settings.windows)
    if not windows:
        need = frames_text(settings.windows.frames)
        problems.append(make_problem("too-few-frames", clip.video, f"{frames_text(frames, duration)}; one window "
                                     f"needs {need}", fix=f"use clips of at least {need}, or move this one out"))
        reference = "-"
    else:
        ref = choose_reference_frame(windows[0], frames, settings.reference, rng)
        if clip.reference_image is not None:
            reference = f"image {clip.reference_image.name} (from metadata)"
        else:
            reference = f"frame {ref.frame} ({ref.mode})" + (f"; {ref.note}" if ref.note else "")
    return ClipPlan(width=w, height=h, rotation=rotation, source_fps=fps, variable_rate=vfr,
                    fps_conversion=_describe_fps(fps, vfr), duration_s=duration, frames=frames,
                    windows=tuple(windows), bucket=str(bucket), crop=crop, reference=reference,
                    audio_source=audio_desc)


# Below this many clips a pool of processes costs more to start (~0.5 s) than it saves.
PROCESS_POOL_MIN_CLIPS = 64


def _executor(workers: int, clips: int, settings: DoctorSettings, hooked: bool) -> Executor:
    """Processes for big datasets (the checks are GIL-bound Python around PyAV), threads otherwise.

    forkserver, not fork: the TUI calls this from a worker thread, and forking a threaded process is unsafe.
    Settings with a custom token counter may not pickle; those runs, and test hooks, stay in threads.
    """
    if workers > 1 and clips >= PROCESS_POOL_MIN_CLIPS and not hooked:
        try:
            pickle.dumps(settings)
            return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"))
        except (pickle.PicklingError, AttributeError, TypeError, ValueError) as exc:
            log.debug("doctor settings cannot go to other processes (%s); using threads", exc)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="doctor")


def _check_all(clips: Sequence[ClipSource], pool: Executor, settings: DoctorSettings,
               progress: ProgressCallback | None, stop: threading.Event | None,
               on_file_read: Callable[[Path], None] | None) -> tuple[list[ClipReport | None], bool]:
    reports: list[ClipReport | None] = [None] * len(clips)
    with pool:
        futures = {pool.submit(inspect_clip, clip, settings, on_file_read): i for i, clip in enumerate(clips)}
        for done, future in enumerate(as_completed(futures), 1):
            if stop is not None and stop.is_set():
                for f in futures:
                    f.cancel()
                return reports, True
            i = futures[future]
            reports[i] = future.result()
            if progress is not None:
                progress(done, len(clips), clips[i].video)
    return reports, False


def inspect_datasets(datasets: Iterable[DatasetSpec | Path | str], settings: DoctorSettings = DoctorSettings(),
                     *, progress: ProgressCallback | None = None, stop: threading.Event | None = None,
                     on_file_read: Callable[[Path], None] | None = None) -> DoctorReport:
    """Discover and check every clip of the datasets, spread over `settings.workers` processes or threads.

    `stop` ends the scan early (the report is then marked cancelled); `progress` is called from the
    calling thread after each clip. The report lists clips in discovery order.
    """
    t0 = time.perf_counter()
    found = discover(datasets)
    total = len(found.clips)
    workers = settings.workers or min(8, os.cpu_count() or 1)
    try:
        reports, cancelled = _check_all(found.clips, _executor(workers, total, settings, on_file_read is not None),
                                        settings, progress, stop, on_file_read)
    except BrokenProcessPool as exc:
        # A child could not start (e.g. a __main__ that cannot be re-imported): same work, in threads.
        log.warning("doctor worker processes failed (%s); checking in threads instead", exc)
        reports, cancelled = _check_all(found.clips, ThreadPoolExecutor(max_workers=workers), settings, progress,
                                        stop, on_file_read)
    clips = tuple(r for r in reports if r is not None)
    elapsed = time.perf_counter() - t0
    log.info("checked %d clips in %.2f s", len(clips), elapsed)
    return DoctorReport(datasets=found.datasets, clips=clips, problems=found.problems, elapsed_s=elapsed,
                        cancelled=cancelled)


def problems_by_code(report: DoctorReport) -> dict[str, list[Problem]]:
    out: dict[str, list[Problem]] = {}
    for p in report.all_problems:
        out.setdefault(p.code, []).append(p)
    return out


__all__: Sequence[str] = ("DoctorSettings", "ClipPlan", "ClipReport", "DoctorReport", "estimate_tokens",
                          "inspect_clip", "inspect_datasets", "problems_by_code")
