"""The order in which training windows are drawn, and how sample dicts become a batch.

The order is a pure function of (seed, epoch), and its state is a position, so a checkpoint stores a few integers
and a resumed run draws exactly the windows an uninterrupted run would. A cached dataset (engine.data.dataset)
brings its own batch sampler, which keeps each batch within one bucket; any other map-style dataset
(`len(ds)`, `ds[i] -> sample dict`) is drawn as a fresh permutation per epoch.

Sample dict contract (engine/data/dataset.py):
    latents [16, T, h, w], motion_latents [16, 19, h, w] or None, ref_latents [16, 1, h, w],
    text [512, D], text_empty [512, D], audio [L, A, 4T], clip_id, window; with crepa.enabled also
    crepa [T, gh, gw, E] (engine.data.crepa_features)
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

SAMPLE_KEYS = ("latents", "motion_latents", "ref_latents", "text", "text_empty", "audio")


class EpochOrder:
    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("the dataset is empty: no training windows to draw")
        self.size = size
        self.seed = seed
        self._epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.size, generator=gen).tolist()
            self._epoch = epoch
        return self._perm

    def index(self, cursor: int) -> tuple[int, int]:
        """(epoch, dataset index) of the window at `cursor`."""
        epoch, pos = divmod(cursor, self.size)
        return epoch, self._permutation(epoch)[pos]


@dataclass
class Batch:
    latents: torch.Tensor  # [B, 16, T, h, w]
    motion_latents: torch.Tensor | None  # [B, 16, 19, h, w]; None when any sample has none
    ref_latents: torch.Tensor
    text: torch.Tensor  # caption dropout already applied
    audio: torch.Tensor
    drop_motion: bool
    clip_ids: list[str]
    crepa_features: torch.Tensor | None = None  # [B, T, gh, gw, E] DINOv2 targets; None when CREPA is off
    # Several processes: this rank's slice [offset, offset + B) of a global batch of `global_size` windows, and
    # its share of the global loss (0 for a rank that got no window and trains a stand-in at zero weight).
    offset: int = 0
    global_size: int = 0  # 0: this batch is the whole global batch
    share: float = 1.0

    def to(self, device: torch.device) -> Batch:
        def move(t):
            return None if t is None else t.to(device, torch.float32, non_blocking=True)

        return Batch(move(self.latents), move(self.motion_latents), move(self.ref_latents), move(self.text),
                     move(self.audio), self.drop_motion, self.clip_ids, move(self.crepa_features), self.offset,
                     self.global_size, self.share)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's part of n windows: contiguous, sizes differing by at most one, in rank order."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _check(sample: dict[str, Any], index: int) -> None:
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise KeyError(f"dataset sample {index} ({sample.get('clip_id', '?')}) lacks {missing}: the cache is "
                       "from an older build; delete the cache folder and run again")


def _stack(samples: Sequence[dict[str, Any]], key: str) -> torch.Tensor:
    shapes = {tuple(s[key].shape) for s in samples}
    if len(shapes) > 1:
        ids = [s.get("clip_id", "?") for s in samples]
        raise ValueError(f"batch of {ids} mixes {key} shapes {sorted(shapes)}: windows of different buckets "
                         "cannot share a batch; set optim.batch_size = 1 or data.bucket = \"fixed\"")
    return torch.stack([torch.as_tensor(s[key]) for s in samples])


def collate(samples: Sequence[dict[str, Any]], caption_drop: Sequence[bool], motion_drop: bool) -> Batch:
    """Stack samples; `caption_drop[i]` swaps sample i's text for its empty-caption embedding; the motion is
    dropped for the whole batch when `motion_drop` or when any sample has no motion latents (a first window)."""
    texts = [s["text_empty"] if drop else s["text"] for s, drop in zip(samples, caption_drop, strict=True)]
    has_motion = all(s["motion_latents"] is not None for s in samples)
    return Batch(
        latents=_stack(samples, "latents"),
        motion_latents=_stack(samples, "motion_latents") if has_motion else None,
        ref_latents=_stack(samples, "ref_latents"),
        text=torch.stack([torch.as_tensor(t) for t in texts]),
        audio=_stack(samples, "audio"),
        drop_motion=bool(motion_drop or not has_motion),
        clip_ids=[str(s.get("clip_id", "")) for s in samples],
        crepa_features=_stack(samples, "crepa") if "crepa" in samples[0] else None,
    )


class CursorOrder:
    """Batches of a plain map-style dataset in EpochOrder; the state is the cursor (windows consumed)."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.order = EpochOrder(size, seed)
        self.batch_size = batch_size
        self.cursor = 0

    @property
    def epoch(self) -> int:
        return self.cursor // self.order.size

    def next_indices(self) -> list[int]:
        out = []
        for _ in range(self.batch_size):
            out.append(self.order.index(self.cursor)[1])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "dataset_size": self.order.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dataset_size") != self.order.size:
            log.warning("the dataset had %s windows when the checkpoint was written and has %d now: training "
                        "continues, but not in the original order", state.get("dataset_size"), self.order.size)
        self.cursor = int(state["cursor"])


class SamplerOrder:
    """Batches of the cache's WindowBatchSampler (windows of one bucket and motion mode per batch, datasets
    mixed by weight); the state is the position after the last consumed batch."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.position = sampler.position
        self._iter = None

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def next_indices(self) -> list[int]:
        if self._iter is None:
            self._iter = iter(self.sampler)
        refs = next(self._iter)
        self.position = type(self.position)(refs[0].epoch, refs[0].batch + 1)
        return [r.index for r in refs]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)  # it warns itself when the data changed
        self.position = self.sampler.position
        self._iter = None


def order_for(dataset, batch_size: int, seed: int):
    """The cache's own batch sampler for a cached dataset, the plain epoch order for any other."""
    plan = getattr(dataset, "plan", None)
    if plan is not None:
        from engine.data.dataset import WindowBatchSampler

        return SamplerOrder(WindowBatchSampler(plan, batch_size, seed))
    return CursorOrder(len(dataset), batch_size, seed)


class BatchSource:
    """Draws batches in the seeded order; caption and motion dropout come from its own generator so they replay
    exactly on resume. `order.state_dict()` is the data position a checkpoint stores."""

    def __init__(self, dataset, batch_size: int, seed: int, caption_dropout: float, motion_drop_prob: float,
                 generator: torch.Generator) -> None:
        self.dataset = dataset
        self.order = order_for(dataset, batch_size, seed)
        self.caption_dropout = caption_dropout
        self.motion_drop_prob = motion_drop_prob
        self.generator = generator

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def next_batch(self, rank: int = 0, world_size: int = 1) -> Batch:
        """The next global batch, or with several processes rank's slice of it (only that slice is read)."""
        indices = self.order.next_indices()
        # Always draw both, whatever the probabilities, so the generator advances the same way every step (and on
        # every rank: the draws are for the whole global batch).
        draws = torch.rand(len(indices) + 1, generator=self.generator).tolist()
        start, stop = shard_bounds(len(indices), rank, world_size)
        share = (stop - start) / len(indices)
        if stop == start:  # a short last batch of an epoch: more ranks than windows
            start, stop = 0, 1
        samples = []
        for index in indices[start:stop]:
            sample = self.dataset[index]
            _check(sample, index)
            samples.append(sample)
        caption_drop = [d < self.caption_dropout for d in draws[start:stop]]
        batch = collate(samples, caption_drop, draws[-1] < self.motion_drop_prob)
        if world_size > 1:
            batch.offset, batch.global_size, batch.share = start, len(indices), share
        return batch
