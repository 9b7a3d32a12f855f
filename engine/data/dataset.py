"""Training samples read from the cache: a Dataset over the planned windows, a resumable batch sampler, collate.

    plan = fill_cache(config, progress_cb, device)             # engine.data.cache_fill, re-exported here
    data = CachedWindowDataset(plan)
    sampler = WindowBatchSampler(plan, batch_size, seed, position=DataPosition(**saved) if saved else None)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate_windows, num_workers=2)
    for batch in loader: ...; saved = batch["position"].next().to_dict()   # stored in the checkpoint

The sample dict (one window; tensors on the CPU, dtypes as cached: latents fp32, text/audio bf16 by default):
    latents         [16, F/4, h, w]   target latents of the window's F new frames (F = 80: 20 latents)
    motion_latents  [16, 19, h, w] or None when the window has no motion frames (first-clip mode only)
    ref_latents     [16, 1, h, w]     reference image latent
    text            [512, D]          UMT5 states of the caption, zero rows after its true length
    text_empty      [512, D]          the same for "" (caption dropout picks it)
    audio           [L, A, F]         wav2vec2 layers x channels x one vector per new frame
    crepa           [F/4, gh, gw, E]  DINOv2 features per target latent (only with crepa.enabled)
    clip_id         str               "<dataset>/<path inside the dataset>"
    window          windows.Window    start, frames, motion_frames (16 fps frame numbers)
Random training choices (drop motion with data.motion_drop_prob, empty caption with data.caption_dropout)
are the loop's, drawn from its own seeded generator; the dataset itself holds no randomness.

Order: each epoch is a fixed function of (seed, epoch). Every window appears `repeats` times per epoch
(its dataset's setting); with several datasets, the epoch's samples are shared among them in proportion to
their weights (each dataset cycles through shuffled copies of its windows), then shuffled together. Batches
hold windows of one shape group (bucket and motion/no motion). Each sample carries its (epoch, batch)
position, so the position saved after a consumed batch is exact whatever the loader prefetched, and a
resumed sampler yields the very same batches that would have followed.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from engine.data.cache import CacheEntryError, CacheStore
from engine.data.cache_fill import CacheProgress, fill_cache, plan_cache  # noqa: F401 - fill_cache is API here
from engine.data.cache_plan import TEXT_LEN, CachePlan, WindowRecord

log = logging.getLogger(__name__)

__all__ = ["CachedDataset", "CachedWindowDataset", "DataPosition", "SampleRef", "WindowBatchSampler", "collate_windows",
           "fill_cache", "CacheProgress"]


class SampleRef(NamedTuple):
    """What the batch sampler hands the dataset: the window index and the batch's place in the run."""

    index: int
    epoch: int
    batch: int


@dataclass(frozen=True)
class DataPosition:
    """The next batch to train on: batch `batch` of epoch `epoch` (past the end means the next epoch)."""

    epoch: int = 0
    batch: int = 0

    def next(self) -> "DataPosition":
        return DataPosition(self.epoch, self.batch + 1)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class CachedWindowDataset(torch.utils.data.Dataset):
    """Map-style dataset over `plan.records`; index with an int or a SampleRef."""

    def __init__(self, plan: CachePlan, store: CacheStore | None = None) -> None:
        if not plan.records:
            raise ValueError(f"no training windows in the cache plan of {plan.root}: every clip was skipped "
                             f"(see `s2v-tui check`) or the datasets are empty")
        if not plan.complete:
            raise ValueError(f"the cache in {plan.root} is incomplete (filling was stopped); run "
                             f"`s2v-tui cache PRESET.toml` to finish it")
        self.plan = plan
        self.records: tuple[WindowRecord, ...] = plan.records
        self.store = store or CacheStore(plan.root)
        self._empty_text: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, kind: str, key: str, record: WindowRecord) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        try:
            return self.store.read(kind, key)
        except FileNotFoundError:
            raise CacheEntryError(self.store.path_for(kind, key), f"the {kind} entry of {record.clip_id} "
                                  f"(window at frame {record.window.start}) is missing from the cache") from None

    def _text(self, key: str, record: WindowRecord) -> torch.Tensor:
        tensors, meta = self._read("text", key, record)
        states = tensors["states"]
        n = int(meta.get("length", states.shape[0]))
        out = states.new_zeros((TEXT_LEN, states.shape[1]))
        out[:n] = states[:n]
        return out

    def __getitem__(self, item: int | SampleRef) -> dict[str, Any]:
        index = item.index if isinstance(item, SampleRef) else int(item)
        r = self.records[index]
        window, _ = self._read("window", r.window_key, r)
        reference, _ = self._read("reference", r.reference_key, r)
        audio, _ = self._read("audio", r.audio_key, r)
        if self._empty_text is None:
            self._empty_text = self._text(self.plan.empty_text_key, r)
        sample = {"latents": window["latents"], "motion_latents": window.get("motion_latents"),
                  "ref_latents": reference["ref_latents"], "text": self._text(r.text_key, r),
                  "text_empty": self._empty_text, "audio": audio["audio"], "clip_id": r.clip_id,
                  "window": r.window}
        if r.crepa_key:
            sample["crepa"] = self._read("crepa", r.crepa_key, r)[0]["features"]
        if isinstance(item, SampleRef):
            sample["position"] = DataPosition(item.epoch, item.batch)
        return sample


class CachedDataset(CachedWindowDataset):
    """The dataset of a run config over its filled cache: pass the plan fill_cache returned, or let it re-plan
    (the dataset check and header reads only: seconds) and refuse a cache with missing entries."""

    def __init__(self, config, plan: CachePlan | None = None) -> None:
        if plan is None:
            work, _, _ = plan_cache(config)
            missing = (len(work.references) + len(work.windows) + len(work.audio) + len(work.texts)
                       + len(work.crepa))
            if missing:
                raise ValueError(f"the cache in {config.cache_path()} lacks {missing} entries for this config; "
                                 f"run `s2v-tui cache PRESET.toml` first")
            plan = work.plan
        super().__init__(plan)


def collate_windows(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of one shape group into a batch; lists for clip_id and window."""
    if not samples:
        raise ValueError("collate_windows got an empty batch")
    shapes = {(tuple(s["latents"].shape), tuple(s["ref_latents"].shape), s["motion_latents"] is None,
               tuple(s["audio"].shape)) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"collate_windows: samples of different shapes in one batch ({sorted(shapes)}); "
                         f"batch them with WindowBatchSampler, which groups windows by bucket and motion")
    out: dict[str, Any] = {
        name: torch.stack([s[name] for s in samples]) for name in ("latents", "ref_latents", "text", "text_empty",
                                                                     "audio")}
    out["motion_latents"] = None if samples[0]["motion_latents"] is None else torch.stack(
        [s["motion_latents"] for s in samples])
    if "crepa" in samples[0]:
        out["crepa"] = torch.stack([s["crepa"] for s in samples])
    out["clip_id"] = [s["clip_id"] for s in samples]
    out["window"] = [s["window"] for s in samples]
    if "position" in samples[0]:
        out["position"] = samples[0]["position"]
    return out


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` into integer parts proportional to `weights` (parts sum to total)."""
    raw = [total * w / sum(weights) for w in weights]
    parts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: (parts[i] - raw[i], i))[: total - sum(parts)]:
        parts[i] += 1
    return parts


class WindowBatchSampler:
    """Endless, deterministic batches of SampleRef for a DataLoader's `batch_sampler`, resumable exactly."""

    def __init__(self, plan: CachePlan, batch_size: int = 1, seed: int = 0,
                 position: DataPosition | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size}: must be at least 1 (optim.batch_size)")
        if not plan.records:
            raise ValueError(f"no training windows in the cache plan of {plan.root}")
        self.records = plan.records
        self.fingerprint = plan.fingerprint
        self.batch_size = batch_size
        self.seed = seed
        self.position = position or DataPosition()
        self._cached: tuple[int, list[list[int]]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        """Window indices of one epoch, before batching."""
        rng = np.random.default_rng([self.seed, epoch])
        datasets: dict[str, list[int]] = {}
        weights: dict[str, float] = {}
        for i, r in enumerate(self.records):
            datasets.setdefault(r.dataset, []).extend([i] * r.repeats)
            weights.setdefault(r.dataset, r.weight)
        if len(datasets) == 1:
            items = next(iter(datasets.values()))
            return [items[k] for k in rng.permutation(len(items))]
        total = sum(len(v) for v in datasets.values())
        quotas = _largest_remainder(total, [weights[d] for d in datasets])
        chosen: list[int] = []
        for (name, items), quota in zip(datasets.items(), quotas):
            while quota > 0:  # whole shuffled passes over the dataset, then part of one more
                take = min(quota, len(items))
                chosen.extend(items[k] for k in rng.permutation(len(items))[:take])
                quota -= take
        return [chosen[k] for k in rng.permutation(len(chosen))]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        batches: list[list[int]] = []
        pending: dict[tuple, list[int]] = {}
        for i in self.epoch_order(epoch):
            group = pending.setdefault(self.records[i].group, [])
            group.append(i)
            if len(group) == self.batch_size:
                batches.append(list(group))
                group.clear()
        batches.extend(g for g in pending.values() if g)  # the epoch's incomplete batches, in first-seen order
        self._cached = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[SampleRef]]:
        epoch, batch = self.position.epoch, self.position.batch
        while True:
            batches = self.epoch_batches(epoch)
            while batch < len(batches):
                yield [SampleRef(i, epoch, batch) for i in batches[batch]]
                batch += 1
            epoch, batch = epoch + 1, 0

    def state_dict(self, position: DataPosition | None = None) -> dict[str, Any]:
        """What a checkpoint stores; pass the position after the last consumed batch (batch["position"].next())."""
        p = position or self.position
        return {"epoch": p.epoch, "batch": p.batch, "seed": self.seed, "batch_size": self.batch_size,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("seed", "batch_size", "fingerprint"):
            if name in state and state[name] != getattr(self, name):
                log.warning("resuming with a different data %s (%s, was %s): the data order cannot continue "
                            "exactly; it continues from epoch %s batch %s of the new order", name,
                            getattr(self, name), state[name], state["epoch"], state["batch"])
        self.position = DataPosition(int(state["epoch"]), int(state["batch"]))
