"""Fill the cache for a run config: plan every entry, then one pass per encoder over the missing ones.

Each encoder (VAE, wav2vec2, UMT5, and DINOv2 with crepa.enabled) is loaded onto the device only for its own
pass and released after it (with torch.cuda.empty_cache on CUDA), so the peak is one encoder: the 24 GB preset can cache
too. No encoder is loaded when its entries all exist, so a second run over a filled cache only hashes
changed files and checks headers. Decoding (PyAV, CPU) runs in two threads ahead of the encoder, so the
device is not left waiting for frames. Progress goes to a callback; the engine logs, it never prints.
"""
from __future__ import annotations

import gc
import itertools
import logging
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from engine.config.errors import ConflictError
from engine.data import media
from engine.data.cache import CacheStore
from engine.data.cache_plan import (AUDIO_RATE, TEXT_LEN, AudioJob, CachePlan, CacheSettings, CrepaJob,
                                    ModelIdentity, PlannedWork, ReferenceJob, ReferenceSource, TextJob, WindowJob,
                                    dataset_specs, doctor_settings, fit_image_transform, plan_work)
from engine.data.discover import DatasetSpec
from engine.data.doctor import DoctorReport, inspect_datasets
from engine.data.problems import DataError, Problem
from engine.data.windows import MODEL_FPS, CropPlan, audio_features_per_frame, latent_frames
from engine.dtypes import TORCH_DTYPES

log = logging.getLogger(__name__)

MODEL_SUBFOLDERS = {"vae": ("vae",), "text": ("text_encoder", "tokenizer"),
                    "audio": ("audio_encoder", "audio_processor")}
_DECODE_THREADS = 2


@dataclass(frozen=True)
class CacheProgress:
    phase: str  # "check" (doctor), "vae", "audio", "text", "crepa"
    done: int
    total: int
    detail: str = ""


ProgressCallback = Callable[[CacheProgress], None]


class CacheStopped(Exception):
    """Raised inside a pass when the stop event is set; fill_cache turns it into plan.complete = False."""


# ---------------------------------------------------------------------------------------------------------
# Model folder and identity


def resolve_model_root(source: str) -> Path:
    """The local S2V model folder (diffusers layout) of model.source, a folder or a hub id."""
    from engine.model_source import fetch_from_hub, require_source

    require_source(source)
    path = Path(source).expanduser()
    needed = [s for subs in MODEL_SUBFOLDERS.values() for s in subs]
    if path.exists():
        missing = [s for s in needed if not (path / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"model.source {source}: no {', '.join(s + '/' for s in missing)} in this folder; "
                                    f"point model.source at the S2V model folder in the diffusers layout "
                                    f"(vae/, text_encoder/, tokenizer/, audio_encoder/, audio_processor/)")
        return path
    # Only the encoders' folders: the 14B transformer is not needed to fill the cache.
    return fetch_from_hub(source, [f"{s}/*" for s in needed])


def model_identity(store: CacheStore, root: Path) -> ModelIdentity:
    def ident(subs: Sequence[str]) -> str:
        return "+".join(store.folder_identity(root / s)[:24] for s in subs)

    return ModelIdentity(vae=ident(MODEL_SUBFOLDERS["vae"]), text=ident(MODEL_SUBFOLDERS["text"]),
                         audio=ident(MODEL_SUBFOLDERS["audio"]))


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Decoding (runs in worker threads)


def _batches(jobs: Iterable[Any], group: Callable[[Any], Any], size: int) -> list[list[Any]]:
    """Jobs cut into batches of at most `size`, each batch of one group (equal shapes), in first-seen order."""
    groups: dict[Any, list[Any]] = {}
    for job in jobs:
        groups.setdefault(group(job), []).append(job)
    return [items[i:i + size] for items in groups.values() for i in range(0, len(items), size)]


def _prefetched(batches: Sequence[list[Any]], load: Callable[[list[Any]], Any]) -> Iterator[tuple[list[Any], Any]]:
    """(batch, load(batch)) in order, with the next batches already loading in threads."""
    with ThreadPoolExecutor(max_workers=_DECODE_THREADS, thread_name_prefix="cache-decode") as pool:
        pending: deque = deque()
        it = iter(batches)
        for batch in itertools.islice(it, _DECODE_THREADS + 1):
            pending.append((batch, pool.submit(load, batch)))
        while pending:
            batch, future = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            try:
                yield batch, future.result()
            except GeneratorExit:
                for _, f in pending:
                    f.cancel()
                raise


def _load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
    except OSError as exc:
        raise ValueError(f"{path}: the reference image cannot be read ({exc}); replace it or remove it from "
                         f"the metadata file") from exc
    plan = fit_image_transform(img.width, img.height, size)
    img = img.resize((plan.resize_w, plan.resize_h), Image.Resampling.BICUBIC)
    img = img.crop((plan.left, plan.top, plan.left + plan.width, plan.top + plan.height))
    return np.asarray(img, dtype=np.uint8)


@lru_cache(maxsize=64)
def _reference_pixels(source: ReferenceSource, transform: CropPlan,
                      size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] of a reference; memoised because first windows reuse their reference as a prefix."""
    if source.image is not None:
        return _load_image(source.image, size)
    return media.decode_frames(source.video, [source.frame / MODEL_FPS], transform)[0]


def _reference_batch(batch: list[ReferenceJob]) -> torch.Tensor:
    return torch.from_numpy(np.stack([_reference_pixels(j.source, j.transform, j.size)[None] for j in batch]))


def _window_pixels(job: WindowJob) -> np.ndarray:
    """uint8 [N, H, W, 3]: motion frames + window, or reference frame + window."""
    frames = media.decode_frames(job.video, job.window.frame_times_s(MODEL_FPS, with_motion=True), job.transform)
    if job.prefix is None:
        return frames
    ref = _reference_pixels(job.prefix.source, job.prefix.transform, job.prefix.size)
    return np.concatenate([ref[None], frames], axis=0)


def _window_batch(batch: list[WindowJob]) -> torch.Tensor:
    return torch.from_numpy(np.stack([_window_pixels(j) for j in batch]))


def _to_video(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, N, H, W, 3] -> float [B, 3, N, H, W] in [-1, 1] on the device (the conversion runs there)."""
    x = pixels.to(device, non_blocking=True).permute(0, 4, 1, 2, 3).float()
    return x / 127.5 - 1.0


def window_audio(job: AudioJob) -> np.ndarray:
    """16 kHz mono samples of the window's audio span (motion frames + window); zero-filled past the track."""
    start_s, end_s = job.window.audio_span_s(MODEL_FPS)
    return media.decode_audio(job.path, start_s, end_s - start_s, rate=AUDIO_RATE).samples


# ---------------------------------------------------------------------------------------------------------
# Encoder passes


class _Pass:
    """Shared plumbing of the passes: progress, stop checks, writes."""

    def __init__(self, store: CacheStore, settings: CacheSettings, emit: ProgressCallback,
                 stop: threading.Event | None, phase: str, total: int) -> None:
        self.store, self.settings, self.emit, self.stop = store, settings, emit, stop
        self.phase, self.total, self.done = phase, total, 0

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise CacheStopped(self.phase)

    def wrote(self, n: int, detail: str) -> None:
        self.done += n
        self.emit(CacheProgress(self.phase, self.done, self.total, detail))


def _vae_pass(work: PlannedWork, root: Path, device: torch.device, p: _Pass) -> None:
    from engine.models.components import encode_video, load_vae

    store_dtype = TORCH_DTYPES[p.settings.latent_store]
    vae = load_vae(root, dtype=TORCH_DTYPES[p.settings.vae_dtype], device=device)
    log.info("VAE on %s: %d reference and %d window latents to encode", device, len(work.references),
             len(work.windows))
    refs = _batches(work.references, lambda j: j.size, p.settings.reference_batch)
    for batch, pixels in _prefetched(refs, _reference_batch):
        p.check_stop()
        z = encode_video(vae, _to_video(pixels, device))
        for job, zi in zip(batch, z):
            p.store.write("reference", job.key, {"ref_latents": zi.to(store_dtype)}, job.recipe)
        p.wrote(len(batch), f"reference {batch[-1].source.describe()}")
    wins = _batches(work.windows, lambda j: (j.transform, j.window.frames, j.window.motion_frames,
                                             j.prefix is None), p.settings.vae_batch)
    for batch, pixels in _prefetched(wins, _window_batch):
        p.check_stop()
        z = encode_video(vae, _to_video(pixels, device))
        for job, zi in zip(batch, z):
            if job.prefix is None:
                m = latent_frames(job.window.motion_frames)
                tensors = {"motion_latents": zi[:, :m], "latents": zi[:, m:]}
            else:
                tensors = {"latents": zi[:, 1:]}  # the reference frame's latent is the causal prefix only
            if tensors["latents"].shape[1] != job.window.latents:
                raise RuntimeError(f"{job.video}: VAE gave {tensors['latents'].shape[1]} target latents for "
                                   f"{job.window.frames} frames, expected {job.window.latents}")
            p.store.write("window", job.key, {k: v.to(store_dtype) for k, v in tensors.items()}, job.recipe)
        p.wrote(len(batch), f"{batch[-1].video.name} @ frame {batch[-1].window.start}")


def _hidden_states_batch(processor, model, waves: list[np.ndarray]) -> torch.Tensor:
    """wav2vec2 hidden states of equal-length waveforms: [B, layers+1, T_a, C] fp32.

    The processor normalises each waveform on its own (as for one utterance), so a batch gives the same
    features as one call per window, up to float rounding.
    """
    values = processor(waves, sampling_rate=AUDIO_RATE, return_tensors="pt").input_values
    device = next(model.parameters()).device
    out = model(values.to(device), output_hidden_states=True)
    return torch.stack(out.hidden_states, dim=1).float()


def _audio_pass(jobs: Sequence[AudioJob], root: Path, device: torch.device, p: _Pass) -> None:
    from engine.models.components import load_audio_encoder

    store_dtype = TORCH_DTYPES[p.settings.feature_store]
    processor, model = load_audio_encoder(root, device=device)
    layers, dim = model.config.num_hidden_layers + 1, model.config.hidden_size
    log.info("wav2vec2 on %s: %d windows", device, len(jobs))

    def load(batch: list[AudioJob]) -> list[np.ndarray | None]:
        out = []
        for job in batch:
            try:
                out.append(None if job.path is None else window_audio(job))
            except DataError as exc:
                if exc.problem.code != "no-audio-stream":
                    raise
                out.append(None)  # the doctor let it through: data.allow_silent_audio is on
        return out

    batches = _batches(jobs, lambda j: j.window.audio_frames, p.settings.audio_batch)
    with torch.no_grad():
        for batch, waves in _prefetched(batches, load):
            p.check_stop()
            real = [w for w in waves if w is not None]
            states = iter(_hidden_states_batch(processor, model, real)) if real else iter(())
            for job, wave in zip(batch, waves):
                if wave is None:
                    feats = torch.zeros(layers, dim, job.window.frames)
                else:
                    # The span starts at the first motion frame; the window's frames follow the motion frames.
                    feats = audio_features_per_frame(next(states), job.window.motion_frames, job.window.frames)
                p.store.write("audio", job.key, {"audio": feats.to(store_dtype)}, job.recipe)
            p.wrote(len(batch), f"audio @ frame {batch[-1].window.start}")


def _crepa_pass(jobs: Sequence[CrepaJob], folder: Path, device: torch.device, p: _Pass) -> None:
    from engine.data.crepa_features import load_encoder, window_features

    store_dtype = TORCH_DTYPES[p.settings.feature_store]
    encoder = load_encoder(folder, device)
    log.info("DINOv2 (CREPA) on %s: %d windows", device, len(jobs))

    def load(batch: list[CrepaJob]) -> list[np.ndarray]:
        # The new frames only (no motion, no reference prefix): those are what the target latents encode.
        return [media.decode_frames(j.video, j.window.frame_times_s(MODEL_FPS, with_motion=False), j.transform)
                for j in batch]

    for batch, frames in _prefetched(_batches(jobs, lambda j: j.grid, 1), load):
        p.check_stop()
        for job, pixels in zip(batch, frames):
            feats = window_features(encoder, pixels, job.grid)
            p.store.write("crepa", job.key, {"features": feats.to(store_dtype)}, job.recipe)
        p.wrote(len(batch), f"{batch[-1].video.name} @ frame {batch[-1].window.start}")


def _crepa_folder(config) -> Path | None:
    """The DINOv2 folder of crepa.encoder when CREPA is on (fetched when a hub id), else None."""
    if not config.crepa.enabled:
        return None
    from engine.data.crepa_features import resolve_encoder

    return resolve_encoder(config.crepa.encoder)


def _text_pass(jobs: Sequence[TextJob], root: Path, device: torch.device, p: _Pass) -> None:
    from engine.models.components import encode_text, load_text_encoder

    store_dtype = TORCH_DTYPES[p.settings.feature_store]
    tokenizer, encoder = load_text_encoder(root, dtype=TORCH_DTYPES[p.settings.text_dtype], device=device)
    log.info("UMT5 on %s: %d captions", device, len(jobs))
    for i in range(0, len(jobs), p.settings.text_batch):
        p.check_stop()
        batch = list(jobs[i:i + p.settings.text_batch])
        captions = [j.caption for j in batch]
        mask = tokenizer(captions, padding="max_length", max_length=TEXT_LEN, truncation=True,
                         add_special_tokens=True, return_attention_mask=True, return_tensors="pt").attention_mask
        states = encode_text(tokenizer, encoder, captions, TEXT_LEN)
        for job, s, n in zip(batch, states, mask.sum(dim=1).tolist()):
            # Stored trimmed to the true length: padding rows are zeros and are restored on read.
            p.store.write("text", job.key, {"states": s[:n].to(store_dtype)}, job.recipe, meta={"length": n})
        p.wrote(len(batch), batch[-1].caption[:40])


# ---------------------------------------------------------------------------------------------------------


def plan_cache(config, progress_cb: ProgressCallback | None = None, *, settings: CacheSettings = CacheSettings(),
               stop: threading.Event | None = None) -> tuple[PlannedWork, CacheStore, Path]:
    """Check the datasets, hash what changed and list the missing entries (no encoder is loaded)."""
    emit = progress_cb or (lambda _p: None)
    store = CacheStore(config.cache_path())
    removed = store.remove_stale_temps()
    if removed:
        log.info("removed %d temporary files left by an interrupted cache write", removed)
    specs = dataset_specs(config, with_eval=True)  # the eval-only clips are cached too
    dsettings = doctor_settings(config)
    report = inspect_datasets(specs, dsettings, stop=stop,
                              progress=lambda d, t, path: emit(CacheProgress("check", d, t, path.name)))
    if report.cancelled:
        raise CacheStopped("check")
    for problem in report.problems:
        log.warning("%s", problem)
    if not any(c.usable for c in report.clips):
        # Before the model is even looked at: with nothing to train on, no encoder must load (UMT5 alone is
        # 11 GB), and the reason belongs to the datasets.
        for clip in report.clips:
            _log_skipped(clip.clip.video, [p for p in clip.problems if p.blocking])
        raise no_windows_error(specs, report)
    root = resolve_model_root(config.model.source)
    ident = model_identity(store, root)
    crepa = _crepa_folder(config)
    if crepa is not None:
        ident = replace(ident, crepa=store.folder_identity(crepa)[:24])
    work = plan_work(list(report.clips), specs, dsettings, store, ident, settings)
    for skip in work.plan.skipped:
        _log_skipped(skip.video, skip.problems)
    return work, store, root


def _log_skipped(video: Path, problems: Sequence[Problem]) -> None:
    log.warning("skipped %s: %s", video, "; ".join(f"{p.code}: {p.message} (fix: {p.fix})" for p in problems)
                or "no window")


class NoTrainingWindows(ConflictError):
    """No clip of the datasets gives a training window. A ConflictError (the config's datasets cannot train)
    whose `file` is the dataset folder(s), so every face prints it as it prints a config problem."""


def no_windows_error(specs: Sequence[DatasetSpec], report: DoctorReport) -> NoTrainingWindows:
    folders = ", ".join(str(s.path) for s in specs)
    key = "data.datasets[0].path" if len(specs) == 1 else "data.datasets"
    if not report.clips:
        found = "; ".join(f"{p.code}: {p.message}" for p in report.problems) or "no video files found"
        return NoTrainingWindows(folders, key, f"no usable training window: {found}",
                                 "put the clips there (mp4, mov, mkv, webm, avi, m4v, each with its caption .txt), "
                                 f"or point {key} at the folder that holds them")
    codes = Counter(p.code for c in report.clips for p in c.problems if p.blocking)
    why = ", ".join(f"{code} x{n}" for code, n in codes.most_common()) or "no window fits"
    n = len(report.clips)
    clips = "the only clip is" if n == 1 else f"all {n} clips are"
    return NoTrainingWindows(folders, key, f"no usable training window: {clips} left out ({why})",
                             "`s2v-tui check PRESET.toml` lists each clip with its problem and fix")


def fill_cache(config, progress_cb: ProgressCallback | None = None, device: str | torch.device | None = None, *,
               settings: CacheSettings = CacheSettings(), stop: threading.Event | None = None) -> CachePlan:
    """Discover, check and plan the config's datasets, then compute every missing cache entry.

    Returns the plan (every usable window with its entry keys; skipped clips with their blocking problems)
    that `CachedWindowDataset` reads. With `stop` set mid-way, the entries written so far are kept and the
    plan comes back with complete = False. `device`: None = CUDA when available.
    """
    emit = progress_cb or (lambda _p: None)
    try:
        work, store, root = plan_cache(config, emit, settings=settings, stop=stop)
    except CacheStopped:  # stopped during the dataset check: nothing planned, nothing written
        return CachePlan(root=Path(config.cache_path()), records=(), empty_text_key="", complete=False)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log.info("cache %s: %d windows; to compute: %d reference, %d window, %d audio, %d text, %d crepa entries",
             store.root, len(work.plan.records), len(work.references), len(work.windows), len(work.audio),
             len(work.texts), len(work.crepa))
    passes = (("vae", len(work.references) + len(work.windows), lambda p: _vae_pass(work, root, dev, p)),
              ("audio", len(work.audio), lambda p: _audio_pass(work.audio, root, dev, p)),
              ("text", len(work.texts), lambda p: _text_pass(work.texts, root, dev, p)),
              ("crepa", len(work.crepa), lambda p: _crepa_pass(work.crepa, _crepa_folder(config), dev, p)))
    complete = True
    for phase, total, run in passes:
        if not total:
            continue
        try:
            run(_Pass(store, settings, emit, stop, phase, total))
        except CacheStopped:
            complete = False
            break
        finally:
            _reference_pixels.cache_clear()
            _release(dev)  # the pass's encoder went out of scope with it; give its memory back now
    store.files.save()
    return replace(work.plan, complete=complete)
