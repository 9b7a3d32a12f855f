"""Dataset discovery and pairing: which videos exist, and which caption, audio and reference go with each.

A dataset is a folder of videos (searched recursively, hidden folders skipped, symlinks followed with loop
detection). Captions come from `metadata.jsonl` / `metadata.csv` at the dataset root when a row names the
clip, otherwise from `<stem>.txt` next to the video. Audio is the video's own track unless a row names an
audio file or the dataset has an audio folder holding `<stem>.wav|flac|mp3|ogg|m4a`. Several datasets can
be combined, each with repeats and a sampling weight. Nothing here writes to the dataset folders.
"""
from __future__ import annotations

import csv
import errno
import json
import logging
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from engine.data.problems import Problem, make_problem

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_KEYS = ("caption", "text", "prompt")
VIDEO_KEYS = ("file_name", "video", "path")
REFERENCE_KEYS = ("reference_image", "reference", "ref_image")
POSE_KEYS = ("pose_video", "pose")
AUDIO_KEYS = ("audio", "audio_path")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset folder and how it is mixed with the others."""

    path: Path
    audio_dir: Path | None = None  # separate audio files `<stem>.<ext>`; None = audio inside the videos
    repeats: int = 1  # times each clip appears per epoch
    weight: float = 1.0  # relative sampling weight among datasets
    name: str | None = None
    caption_prefix: str = ""  # trigger word put before every caption of this dataset
    caption_separator: str = ", "
    default_caption: str | None = None  # caption of clips without one; None = such clips are refused

    def caption_text(self, caption: str) -> str:
        """The text the model is given for `caption`: the prefix, the separator, then the caption. An empty
        caption keeps the prefix alone, so the trigger word never trails a stray separator."""
        if not self.caption_prefix:
            return caption
        return self.caption_prefix + (self.caption_separator + caption if caption else "")

    @classmethod
    def of_entry(cls, entry, name: str | None = None) -> DatasetSpec:
        """One [[data.datasets]] entry of a run config (engine.config's DatasetEntry) as the doctor, the cache and
        the run read it, every key of the entry carried over; the config's '' (none) is None here."""
        return cls(path=Path(entry.path).expanduser(),
                   audio_dir=Path(entry.audio_dir).expanduser() if entry.audio_dir else None,
                   repeats=entry.repeats, weight=entry.weight, name=name, caption_prefix=entry.caption_prefix,
                   caption_separator=entry.caption_separator, default_caption=entry.default_caption or None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.audio_dir is not None:
            object.__setattr__(self, "audio_dir", Path(self.audio_dir))
        if self.repeats < 1:
            raise ValueError(f"dataset {self.path}: repeats = {self.repeats}, must be at least 1")
        if not self.weight > 0:
            raise ValueError(f"dataset {self.path}: weight = {self.weight}, must be greater than 0")

    @property
    def label(self) -> str:
        return self.name or self.path.name or str(self.path)


@dataclass(frozen=True)
class ClipSource:
    """A video and everything paired with it. `problems` holds what discovery already found wrong."""

    video: Path
    dataset: str
    caption: str | None
    caption_source: Path | None  # the .txt or metadata file the caption came from
    audio: Path | None  # a separate audio file; None = the video's own audio track
    reference_image: Path | None = None
    pose_video: Path | None = None
    repeats: int = 1
    weight: float = 1.0
    problems: tuple[Problem, ...] = field(default=())

    @property
    def stem(self) -> str:
        return self.video.stem

    @property
    def audio_path(self) -> Path:
        """The file whose first audio track is used."""
        return self.audio if self.audio is not None else self.video


@dataclass(frozen=True)
class Discovery:
    datasets: tuple[DatasetSpec, ...]
    clips: tuple[ClipSource, ...]
    problems: tuple[Problem, ...]  # findings not tied to one clip: loops, bad metadata rows, empty datasets


def decode_caption_bytes(data: bytes) -> str | None:
    """UTF-8 (with or without BOM) or BOM-marked UTF-16; None when it is neither."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _walk_videos(root: Path, problems: list[Problem]) -> list[Path]:
    """Video files under root, sorted; symlinked folders followed once, loops reported and skipped."""
    found: list[Path] = []
    try:
        root_st = os.stat(root)
    except OSError as exc:
        code = "symlink-loop" if exc.errno == errno.ELOOP else "missing-file"
        problems.append(make_problem(code, root, f"dataset folder cannot be opened: {exc.strerror}",
                                     fix="pass an existing dataset folder"))
        return found
    if not stat.S_ISDIR(root_st.st_mode):
        problems.append(make_problem("missing-file", root, "not a folder", fix="pass the dataset folder"))
        return found
    seen: set[tuple[int, int]] = set()
    # Each entry carries the identities of its ancestors: a link to one of them is a loop.
    stack: list[tuple[Path, tuple[tuple[int, int], ...]]] = [(root, ())]
    while stack:
        folder, ancestors = stack.pop()
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            log.debug("folder %s already scanned through another link", folder)
            continue
        seen.add(key)
        chain = ancestors + (key,)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s: %s", folder, exc)
            continue
        subfolders: list[Path] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                target = os.stat(path)  # follows links
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    problems.append(make_problem("symlink-loop", path, f"the link resolves to itself "
                                                 f"({os.readlink(path)!r} -> ...)"))
                elif entry.is_symlink():
                    problems.append(make_problem("broken-symlink", path,
                                                 f"the link points at {os.readlink(path)!r}, which does not exist"))
                continue
            if stat.S_ISDIR(target.st_mode):
                if (target.st_dev, target.st_ino) in chain:
                    problems.append(make_problem("symlink-loop", path, f"the link points back at "
                                                 f"{os.readlink(path)!r}, a folder that contains it; not followed"))
                    continue
                subfolders.append(path)
            elif stat.S_ISREG(target.st_mode) and path.suffix.lower() in VIDEO_EXTENSIONS:
                found.append(path)
        stack.extend((sub, chain) for sub in reversed(subfolders))
    return sorted(found)


@dataclass(frozen=True)
class _Row:
    source: Path  # metadata file
    line: int
    caption: str | None
    audio: Path | None
    reference_image: Path | None
    pose_video: Path | None


def _first(row: dict, keys: Sequence[str]) -> str | None:
    for k in keys:
        v = row.get(k)
        if v is not None and str(v).strip() != "":
            return str(v)
    return None


def _read_metadata(root: Path, problems: list[Problem]) -> dict[Path, _Row]:
    """Rows keyed by the resolved video path they describe."""
    rows: dict[Path, _Row] = {}
    for name in METADATA_FILES:
        meta = root / name
        if not meta.is_file():
            continue
        text = decode_caption_bytes(meta.read_bytes())
        if text is None:
            problems.append(make_problem("metadata-invalid", meta, "the file is not UTF-8 text",
                                         fix="re-save the metadata file as UTF-8"))
            continue
        if name.endswith(".jsonl"):
            records = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    problems.append(make_problem("metadata-invalid", meta, f"line {n}: not JSON ({exc.msg})"))
                    continue
                if not isinstance(obj, dict):
                    problems.append(make_problem("metadata-invalid", meta, f"line {n}: not a JSON object"))
                    continue
                records.append((n, obj))
        else:
            records = [(n, r) for n, r in enumerate(csv.DictReader(text.splitlines()), 2)]
        for n, rec in records:
            vid = _first(rec, VIDEO_KEYS)
            if vid is None:
                problems.append(make_problem("metadata-invalid", meta, f"line {n}: no file_name"))
                continue
            video = (root / vid).resolve()
            if video in rows:
                problems.append(make_problem("metadata-invalid", meta,
                                             f"line {n}: {vid} is described twice (also line {rows[video].line} "
                                             f"of {rows[video].source.name})", fix="keep one row per clip"))
                continue
            if not video.is_file():
                problems.append(make_problem("missing-file", meta, f"line {n}: video {vid!r} does not exist"))
                continue
            paths = {}
            for label, keys in (("audio", AUDIO_KEYS), ("reference_image", REFERENCE_KEYS),
                                ("pose_video", POSE_KEYS)):
                value = _first(rec, keys)
                paths[label] = (root / value) if value else None
            # A caption column that is present but blank is an empty caption, not a missing one.
            caption = next((str(rec[k]) for k in CAPTION_KEYS if rec.get(k) is not None), None)
            rows[video] = _Row(meta, n, caption, paths["audio"], paths["reference_image"], paths["pose_video"])
    return rows


def _audio_index(audio_dir: Path) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = defaultdict(list)
    try:
        entries = sorted(os.scandir(audio_dir), key=lambda e: e.name)
    except OSError:
        return index
    for entry in entries:
        p = Path(entry.path)
        if p.suffix.lower() in AUDIO_EXTENSIONS and not entry.name.startswith("."):
            index[p.stem].append(p)
    return index


def _caption_for(video: Path, row: _Row | None) -> tuple[str | None, Path | None, list[Problem]]:
    if row is not None and row.caption is not None:
        return row.caption, row.source, []
    txt = video.with_suffix(".txt")
    if not txt.is_file():
        where = f"no {txt.name}" + (f" and no caption in {row.source.name}" if row else "")
        return None, None, [make_problem("caption-missing", video, where)]
    text = decode_caption_bytes(txt.read_bytes())
    if text is None:
        return None, txt, [make_problem("caption-undecodable", txt, "not UTF-8 (nor UTF-16 with a BOM)")]
    return text.strip(), txt, []


def discover_dataset(spec: DatasetSpec) -> Discovery:
    problems: list[Problem] = []
    videos = _walk_videos(spec.path, problems)
    if not videos and not any(p.code == "missing-file" and p.path == spec.path for p in problems):
        problems.append(make_problem("dataset-empty", spec.path,
                                     f"no {'/'.join(e[1:] for e in VIDEO_EXTENSIONS)} files found"))
    rows = _read_metadata(spec.path, problems) if spec.path.is_dir() else {}
    audio_index = _audio_index(spec.audio_dir) if spec.audio_dir is not None else {}
    if spec.audio_dir is not None and not spec.audio_dir.is_dir():
        problems.append(make_problem("missing-file", spec.audio_dir, "the audio folder does not exist",
                                     fix="pass the folder that holds <stem>.wav files"))

    # Stems must be unique per folder (captions pair by stem) and dataset-wide with an audio folder.
    groups: dict[tuple, list[Path]] = defaultdict(list)
    for v in videos:
        groups[(v.stem,) if spec.audio_dir is not None else (v.parent, v.stem)].append(v)

    clips: list[ClipSource] = []
    for video in videos:
        found: list[Problem] = []
        twins = [o for o in groups[(video.stem,) if spec.audio_dir is not None else (video.parent, video.stem)]
                 if o != video]
        if twins:
            found.append(make_problem("duplicate-stem", video, "same stem as " + ", ".join(str(t) for t in twins)))
        row = rows.get(video.resolve())
        caption, caption_source, cap_problems = _caption_for(video, row)
        if caption is None and caption_source is None and spec.default_caption is not None:
            # A missing caption (not an unreadable one) takes the dataset's default, and says so.
            caption = spec.default_caption
            cap_problems = [make_problem("caption-default", video, f"no caption file; default_caption "
                                         f"{spec.default_caption!r} is used")]
        if caption is not None:
            caption = spec.caption_text(caption)
        found += cap_problems
        audio = None
        if row is not None and row.audio is not None:
            audio = row.audio
            if not audio.is_file():
                found.append(make_problem("missing-file", row.source,
                                          f"line {row.line}: audio {str(audio)!r} does not exist"))
        elif spec.audio_dir is not None:
            matches = audio_index.get(video.stem, [])
            if not matches:
                found.append(make_problem("audio-missing", video, f"no {video.stem}.<wav|flac|mp3|ogg|m4a> "
                                          f"in {spec.audio_dir}"))
            elif len(matches) > 1:
                found.append(make_problem("audio-ambiguous", video,
                                          "matching audio files: " + ", ".join(m.name for m in matches)))
            else:
                audio = matches[0]
        extra = {}
        if row is not None:
            for label in ("reference_image", "pose_video"):
                p = getattr(row, label)
                if p is not None and not p.is_file():
                    found.append(make_problem("missing-file", row.source,
                                              f"line {row.line}: {label} {str(p)!r} does not exist"))
                extra[label] = p
        clips.append(ClipSource(video=video, dataset=spec.label, caption=caption, caption_source=caption_source,
                                audio=audio, repeats=spec.repeats, weight=spec.weight, problems=tuple(found),
                                **extra))
    return Discovery(datasets=(spec,), clips=tuple(clips), problems=tuple(problems))


def discover(specs: Iterable[DatasetSpec | Path | str]) -> Discovery:
    """Discover several datasets; plain paths become DatasetSpec(path) with audio inside the videos."""
    parts = [discover_dataset(s if isinstance(s, DatasetSpec) else DatasetSpec(Path(s))) for s in specs]
    return Discovery(datasets=tuple(d for p in parts for d in p.datasets),
                     clips=tuple(c for p in parts for c in p.clips),
                     problems=tuple(pr for p in parts for pr in p.problems))


def epoch_length(clips: Sequence[ClipSource]) -> int:
    """Samples per epoch: every clip counted `repeats` times."""
    return sum(c.repeats for c in clips)


def sampling_probabilities(clips: Sequence[ClipSource]) -> list[float]:
    """Per-clip probability of being drawn when mixing datasets by weight.

    A dataset's weight is shared among its clips in proportion to their repeats, so weights set the mix
    between datasets whatever their sizes, and repeats set how long an epoch is (epoch_length).
    """
    per_dataset: dict[str, int] = defaultdict(int)
    for c in clips:
        per_dataset[c.dataset] += c.repeats
    raw = [c.weight * c.repeats / per_dataset[c.dataset] for c in clips]
    total = sum(raw)
    return [r / total for r in raw] if total else []
