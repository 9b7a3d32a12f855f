"""What the cache must hold for a run config: every training window, and the recipe of each entry it reads.

Planning runs the dataset doctor (discovery, pairing, probing, window arithmetic, bucket and crop) so the
cache, `s2v-tui check` and training always agree on which clips and windows exist. Then every window gets
four entries (five with CREPA; kinds of `CacheStore`), each named by the hash of its recipe (see cache.py):

- window:    target latents [16, F/4, h, w] (+ motion latents [16, 19, h, w] when it has the 73 frames before
             it). Frame semantics, following the official speech2video generate loop (spec §4.1, §5):
             * with motion frames: encode(73 motion + 80 new frames) = 39 latents, split 19 | 20. Inference
               decodes a continuation clip as decode(19 motion latents ‖ 20 new) and keeps the last 80 frames,
               so the 20 targets are what the causal VAE makes of the 80 frames after having seen the 73.
             * without (a clip's first window, or motion_frames = 0): encode(reference frame + 80 frames) = 21
               latents, the first dropped. Inference decodes the first clip as decode(reference latent ‖ 20 new)
               (then drops the first frames), so the generated latents live in the causal context of the
               reference frame; encoding the window after the reference gives targets in that same context.
               The reference frame is part of this entry's recipe.
             * a window with motion whose motion the loop drops (data.motion_drop_prob) keeps the targets
               encoded after its motion frames: the causal VAE's context reaches back only a few frames, and
               a second encode per window (after the reference) would cost half the VAE time again.
- reference: the reference image's latent [16, 1, h, w] (a frame of the clip picked by data.reference, or
             the clip's reference image from metadata), encoded alone as a 1-frame video, as inference does.
- audio:     wav2vec2 features on the video time base [layers+1, dim, F]: the encoder runs over the audio of
             motion frames + window (so the window's features have context), features are mapped to one
             vector per 16 fps frame over that span (windows.audio_features_per_frame), and the window's F
             columns are kept. Clips allowed to train without audio get zeros (the model's "no audio").
- crepa:     with crepa.enabled only: DINOv2 patch features of the window's new frames, one grid per target
             latent [T, gh, gw, E] (engine.data.crepa_features says which frames and grid); keyed by the clip
             window, the crop and the encoder's identity like the latents.
- text:      UMT5 states of the caption trimmed to its true token length (padded back to 512 on read), and
             one entry for the empty caption used by caption dropout.

Random choices (reference frame in random/outside mode) are drawn from a generator seeded by train.seed, the
clip id and the window start, so a plan is the same in every process.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.cache import CacheStore, recipe_key
from engine.data.crepa_features import FRAMES_PER_LATENT, feature_grid
from engine.data.discover import ClipSource, DatasetSpec
from engine.data.doctor import ClipReport, DoctorSettings
from engine.data.problems import Problem
from engine.data.windows import (MODEL_FPS, Bucket, BucketSettings, CropPlan, Window, WindowSettings,
                                 choose_reference_frame, crop_for)

TEXT_LEN = 512
AUDIO_RATE = 16000
KINDS = ("window", "reference", "audio", "text", "crepa")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class CacheSettings:
    """Numerics and batching of the encoders. Dtypes are in every recipe; batch sizes change no result."""

    vae_dtype: str = "fp32"  # the official pipeline runs the Wan VAE in fp32
    text_dtype: str = "bf16"  # UMT5-XXL ships and runs in bf16
    latent_store: str = "fp32"  # latents are training targets: kept at full precision
    feature_store: str = "bf16"  # text and audio features only feed bf16 projections: half the disk
    vae_batch: int = 1  # windows per VAE call (long clips at 832x480 fill a 24 GB card one at a time)
    reference_batch: int = 8
    audio_batch: int = 4
    text_batch: int = 8
    verify_existing: bool = False  # read every existing entry in full (digest) instead of its header only

    def __post_init__(self) -> None:
        for name in ("vae_dtype", "text_dtype", "latent_store", "feature_store"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"cache setting {name} = {getattr(self, name)!r}: choose one of {', '.join(DTYPES)}")
        for name in ("vae_batch", "reference_batch", "audio_batch", "text_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"cache setting {name} = {getattr(self, name)}: must be at least 1")


@dataclass(frozen=True)
class ModelIdentity:
    """Content identities of the three encoders (hashes of their model folders)."""

    vae: str
    text: str
    audio: str
    crepa: str = ""  # the DINOv2 folder of crepa.encoder; "" = CREPA off, no crepa entries planned


@dataclass(frozen=True)
class ReferenceSource:
    video: Path | None = None  # a frame of the clip ...
    frame: int | None = None
    image: Path | None = None  # ... or a separate image named by the metadata

    def describe(self) -> str:
        return f"image {self.image.name}" if self.image is not None else f"frame {self.frame}"


@dataclass(frozen=True)
class WindowRecord:
    """One training window and the keys of the entries it reads."""

    clip_id: str  # "<dataset>/<path inside the dataset>"
    dataset: str
    video: Path
    window: Window
    bucket: tuple[int, int]  # (width, height) in pixels
    reference: ReferenceSource
    repeats: int
    weight: float
    window_key: str
    reference_key: str
    audio_key: str
    text_key: str
    crepa_key: str = ""  # "" when CREPA is off

    @property
    def group(self) -> tuple[int, int, bool]:
        """Samples of one group have equal tensor shapes and can share a batch."""
        return (*self.bucket, self.window.has_motion)


@dataclass(frozen=True)
class SkippedClip:
    video: Path
    problems: tuple[Problem, ...]


# Jobs: what an encoder pass must compute for one missing entry.
@dataclass(frozen=True)
class ReferenceJob:
    key: str
    recipe: dict[str, Any] = field(compare=False)
    source: ReferenceSource
    transform: CropPlan  # for a clip frame; images are fitted to (width, height) with crop_for
    size: tuple[int, int]


@dataclass(frozen=True)
class WindowJob:
    key: str
    recipe: dict[str, Any] = field(compare=False)
    video: Path
    window: Window
    transform: CropPlan
    prefix: ReferenceJob | None  # the reference frame encoded before a window without motion


@dataclass(frozen=True)
class AudioJob:
    key: str
    recipe: dict[str, Any] = field(compare=False)
    path: Path | None  # None: zero features (clip allowed to train without audio)
    window: Window


@dataclass(frozen=True)
class CrepaJob:
    key: str
    recipe: dict[str, Any] = field(compare=False)
    video: Path
    window: Window
    transform: CropPlan
    grid: tuple[int, int]


@dataclass(frozen=True)
class TextJob:
    key: str
    recipe: dict[str, Any] = field(compare=False)
    caption: str


@dataclass(frozen=True)
class CachePlan:
    root: Path
    records: tuple[WindowRecord, ...]
    empty_text_key: str
    skipped: tuple[SkippedClip, ...] = ()
    complete: bool = True  # False when filling was stopped before every entry existed
    # (video, problem) for each non-blocking problem of a clip that trains (a caption cut at 512 tokens, audio
    # shorter than the video, ...): what `s2v-tui check` shows as warnings, for the run to show too.
    warnings: tuple[tuple[Path, Problem], ...] = ()

    @property
    def fingerprint(self) -> str:
        """Hash of the window list and its keys: equal plans give equal data orders."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.clip_id}|{r.window.start}|{r.repeats}|{r.weight}|{r.window_key}|{r.reference_key}|"
                     f"{r.audio_key}|{r.text_key}\n".encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class PlannedWork:
    plan: CachePlan
    references: tuple[ReferenceJob, ...]
    windows: tuple[WindowJob, ...]
    audio: tuple[AudioJob, ...]
    texts: tuple[TextJob, ...]
    crepa: tuple[CrepaJob, ...] = ()


# ---------------------------------------------------------------------------------------------------------
# From the run config


def dataset_specs(config, with_eval: bool = False) -> list[DatasetSpec]:
    """The config's training datasets, and with `with_eval` its validation.eval_loss.datasets after them (cached
    like them, never trained: engine.data.holdout); labels made unique so clip ids never collide."""
    if not config.data.datasets:
        raise ValueError("the config has no [[data.datasets]] table; add one with `path = \"FOLDER\"`")
    specs, seen = [], set()
    entries = list(config.data.datasets) + (list(config.validation.eval_loss.datasets) if with_eval else [])
    for entry in entries:
        path = Path(entry.path).expanduser()
        label, n = path.name or str(path), 2
        while label in seen:
            label, n = f"{path.name}#{n}", n + 1
        seen.add(label)
        specs.append(DatasetSpec.of_entry(entry, name=label))
    return specs


def eval_dataset_labels(config) -> frozenset[str]:
    """The labels (clip id prefixes) of the config's validation.eval_loss.datasets."""
    if not config.validation.eval_loss.datasets:
        return frozenset()
    return frozenset(s.label for s in dataset_specs(config, with_eval=True)[len(config.data.datasets):])


def doctor_settings(config) -> DoctorSettings:
    """The doctor's settings for a run config: its windows, buckets, crop, reference and seed."""
    d = config.data
    width, height = d.resolution
    if d.bucket == "fixed":
        buckets = BucketSettings(max_area=width * height, fixed=f"{width}x{height}")
    else:
        buckets = BucketSettings(max_area=width * height)
    windows = WindowSettings(frames=d.frames, motion_frames=d.motion_frames, stride=d.frames,
                             max_windows=d.windows_per_clip or None)
    # The smallest accepted side follows the configured size, so a small training resolution accepts clips
    # that a full-size one would call too small.
    return DoctorSettings(windows=windows, buckets=buckets, crop=d.crop, reference=d.reference,
                          allow_silent_audio=d.allow_silent_audio, min_side=min(256, width, height),
                          seed=config.train.seed)


def _dtype_recipe(settings: CacheSettings) -> dict[str, str]:
    return {"vae_dtype": settings.vae_dtype, "latent_store": settings.latent_store}


def _crop_list(crop: CropPlan) -> list[int]:
    return [crop.resize_w, crop.resize_h, crop.left, crop.top, crop.width, crop.height]


def clip_id_of(clip: ClipSource, specs: dict[str, DatasetSpec]) -> str:
    """"<dataset label>/<path inside the dataset>": the identity of a clip in records, holdout and check."""
    spec = specs.get(clip.dataset)
    try:
        rel = clip.video.relative_to(spec.path).as_posix() if spec else clip.video.name
    except ValueError:
        rel = clip.video.name
    return f"{clip.dataset}/{rel}"


def _no_audio(clip: ClipSource) -> bool:
    """Pairing failed (allowed by allow_silent_audio): the clip trains with zero audio, never with the video's."""
    return any(p.code in ("audio-missing", "audio-ambiguous") for p in clip.problems)


def text_recipe(caption: str, ident: ModelIdentity, settings: CacheSettings) -> dict[str, Any]:
    return {"kind": "text", "encoder": ident.text, "dtype": settings.text_dtype, "store": settings.feature_store,
            "text_sha256": hashlib.sha256(caption.encode("utf-8")).hexdigest(), "text_len": TEXT_LEN}


def plan_work(reports: list[ClipReport], specs: list[DatasetSpec], settings: DoctorSettings,
              store: CacheStore, ident: ModelIdentity, cache: CacheSettings) -> PlannedWork:
    """Every record of the usable clips and the job of every entry that is not in the store yet."""
    by_label = {s.label: s for s in specs}
    records: list[WindowRecord] = []
    skipped: list[SkippedClip] = []
    warnings: list[tuple[Path, Problem]] = []
    refs: dict[str, ReferenceJob] = {}
    wins: dict[str, WindowJob] = {}
    auds: dict[str, AudioJob] = {}
    texts: dict[str, TextJob] = {}
    creps: dict[str, CrepaJob] = {}

    def want_text(caption: str) -> str:
        recipe = text_recipe(caption, ident, cache)
        key = recipe_key(recipe)
        texts.setdefault(key, TextJob(key, recipe, caption))
        return key

    empty_key = want_text("")
    for report in reports:
        clip, plan = report.clip, report.plan
        if not report.usable or plan is None:
            skipped.append(SkippedClip(clip.video, tuple(p for p in report.problems if p.blocking)))
            continue
        warnings.extend((clip.video, p) for p in report.problems if not p.blocking)
        clip_id = clip_id_of(clip, by_label)
        transform = plan.crop
        size = (plan.crop.width, plan.crop.height)
        video_sha = store.file_digest(clip.video)
        silent = _no_audio(clip)
        audio_sha = None if silent else store.file_digest(clip.audio_path)
        image_sha = store.file_digest(clip.reference_image) if clip.reference_image is not None else None
        text_key = want_text(clip.caption or "")
        for window in plan.windows:
            if clip.reference_image is not None:
                source = ReferenceSource(image=clip.reference_image)
                src_recipe: dict[str, Any] = {"image_sha256": image_sha, "fit": "center"}
            else:
                rng = random.Random(f"{settings.seed}|{clip_id}|{window.start}")
                frame = choose_reference_frame(window, plan.frames, settings.reference, rng).frame
                source = ReferenceSource(video=clip.video, frame=frame)
                src_recipe = {"video_sha256": video_sha, "frame": frame, "fps": MODEL_FPS,
                              "transform": _crop_list(transform)}
            ref_recipe = {"kind": "reference", "vae": ident.vae, "size": list(size), **src_recipe,
                          **_dtype_recipe(cache)}
            ref_key = recipe_key(ref_recipe)
            ref_job = ReferenceJob(ref_key, ref_recipe, source, transform, size)
            refs.setdefault(ref_key, ref_job)

            win_recipe = {"kind": "window", "vae": ident.vae, "video_sha256": video_sha, "fps": MODEL_FPS,
                          "transform": _crop_list(transform), "start": window.start,
                          "frames": window.frames, "motion_frames": window.motion_frames,
                          "prefix": None if window.has_motion else ref_key, **_dtype_recipe(cache)}
            win_key = recipe_key(win_recipe)
            wins.setdefault(win_key, WindowJob(win_key, win_recipe, clip.video, window, transform,
                                               None if window.has_motion else ref_job))

            aud_recipe = {"kind": "audio", "encoder": ident.audio, "store": cache.feature_store,
                          "audio_sha256": audio_sha or "zeros", "rate": AUDIO_RATE, "fps": MODEL_FPS,
                          "first_frame": window.motion_start, "context_frames": window.motion_frames,
                          "frames": window.frames}
            aud_key = recipe_key(aud_recipe)
            auds.setdefault(aud_key, AudioJob(aud_key, aud_recipe, None if silent else clip.audio_path, window))

            crepa_key = ""
            if ident.crepa:
                grid = feature_grid(*size)
                crepa_recipe = {"kind": "crepa", "encoder": ident.crepa, "video_sha256": video_sha, "fps": MODEL_FPS,
                                "transform": _crop_list(transform), "start": window.start, "frames": window.frames,
                                "grid": list(grid), "frames_per_latent": FRAMES_PER_LATENT,
                                "store": cache.feature_store}
                crepa_key = recipe_key(crepa_recipe)
                creps.setdefault(crepa_key, CrepaJob(crepa_key, crepa_recipe, clip.video, window, transform, grid))

            records.append(WindowRecord(clip_id=clip_id, dataset=clip.dataset, video=clip.video, window=window,
                                        bucket=size, reference=source, repeats=clip.repeats, weight=clip.weight,
                                        window_key=win_key, reference_key=ref_key, audio_key=aud_key,
                                        text_key=text_key, crepa_key=crepa_key))
    store.files.save()

    def missing(kind: str, jobs: dict[str, Any]) -> tuple:
        return tuple(j for k, j in jobs.items() if not store.has(kind, k, verify=cache.verify_existing))

    plan = CachePlan(root=store.root, records=tuple(records), empty_text_key=empty_key, skipped=tuple(skipped),
                     warnings=tuple(warnings))
    return PlannedWork(plan=plan, references=missing("reference", refs), windows=missing("window", wins),
                       audio=missing("audio", auds), texts=missing("text", texts), crepa=missing("crepa", creps))


def fit_image_transform(width: int, height: int, size: tuple[int, int]) -> CropPlan:
    """Scale-to-cover and centre-crop an image of (width, height) to the bucket `size`."""
    return crop_for(width, height, Bucket(*size), "center")
