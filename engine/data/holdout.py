"""The held-out eval split (validation.eval_loss.holdout): a fraction of the clips that never trains and that the
evaluation loss measures instead of training windows.

Which clips: every clip id is ranked by sha256("<train.seed>|<clip id>") and the first round(fraction * clips)
are held out. The choice is a function of the seed and the clip identities alone, so a resumed run, `s2v-tui
check` and the cache all name the same clips, and adding a clip moves at most the clips near the cut (a plain
shuffle of the list would reshuffle them all). The split is by clip, never by window: two windows of one clip
overlap in motion frames and share a speaker and a caption, so a window of a training clip would leak into the
measurement. Held-out clips are cached like the others (they are in the same plan) and only left out of the
training order.

The clips of validation.eval_loss.datasets (folders of their own) are held out whole: they are planned and cached
with the training datasets (engine.data.cache_plan.dataset_specs with_eval) and leave the training order here too;
the fraction then applies to the training datasets' clips only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Sequence

HOLDOUT_KEY = "validation.eval_loss.holdout"
DATASETS_KEY = "validation.eval_loss.datasets"


class HoldoutError(ValueError):
    """A holdout that leaves no training clip or no evaluation clip; the message names the key and the fix."""


def holdout_count(fraction: float, clips: int) -> int:
    """Clips held out of `clips` at `fraction` (rounded half up)."""
    return math.floor(fraction * clips + 0.5)


def _rank(seed: int, clip_id: str) -> str:
    return hashlib.sha256(f"{seed}|{clip_id}".encode()).hexdigest()


def held_out_clips(clip_ids: Iterable[str], fraction: float, seed: int) -> frozenset[str]:
    """The clip ids held out at `fraction` (0 <= fraction < 1) with `seed`; HoldoutError when the split would
    leave either side empty. fraction 0 holds out nothing."""
    unique = sorted(set(clip_ids))
    if not 0.0 <= fraction < 1.0:
        raise HoldoutError(f"{HOLDOUT_KEY} = {fraction:g} is not a fraction in [0, 1): e.g. 0.1 holds out 10% of "
                           "the clips")
    if fraction == 0:
        return frozenset()
    n = holdout_count(fraction, len(unique))
    if n == 0:
        need = 0.5 / len(unique) if unique else 1.0
        raise HoldoutError(f"{HOLDOUT_KEY} = {fraction:g} of {len(unique)} clip(s) holds out no clip, so the eval "
                           f"loss would have nothing to measure: raise it to at least {math.ceil(need * 100) / 100:g}"
                           ", add clips, or set holdout = 0 (the eval loss then uses training windows)")
    if n >= len(unique):
        raise HoldoutError(f"{HOLDOUT_KEY} = {fraction:g} of {len(unique)} clip(s) holds out every clip, so nothing "
                           "would train: lower it, add clips, or set holdout = 0")
    return frozenset(sorted(unique, key=lambda c: _rank(seed, c))[:n])


def held_out_ids(clips: Sequence[tuple[str, str]], fraction: float, seed: int,
                 eval_datasets: frozenset[str] = frozenset()) -> frozenset[str]:
    """The held-out clip ids of (clip id, dataset label) pairs (one per window or per clip): every clip of the
    `eval_datasets` labels, and `fraction` of the others. HoldoutError when no clip would train or none be
    measured."""
    ids = {c for c, _ in clips}
    held = frozenset(c for c, label in clips if label in eval_datasets)
    if eval_datasets and not held:
        raise HoldoutError(f"{DATASETS_KEY} gave no usable clip (see the skipped clips, or `s2v-tui check "
                           "PRESET.toml`): fix those clips or remove the eval datasets")
    if eval_datasets and held == ids:
        raise HoldoutError("no clip of [[data.datasets]] is usable, so nothing would train (the clips of "
                           f"{DATASETS_KEY} never train): fix the training clips")
    return held | held_out_clips(sorted(ids - held), fraction, seed)


class IndexSubset:
    """The windows `indices` of a map-style dataset of sample dicts (len, [i]), in that order."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[int(index)]]


def dataset_clip_ids(dataset) -> list[str]:
    """The clip id of every window of `dataset`: from its cache records when it has them (no tensor is read),
    else from each sample dict."""
    records = getattr(dataset, "records", None)
    if records is not None:
        return [r.clip_id for r in records]
    return [str(dataset[i]["clip_id"]) for i in range(len(dataset))]


def split_dataset(dataset, fraction: float, seed: int, eval_datasets: frozenset[str] = frozenset()):
    """(training windows, held-out windows, held-out clip ids) of `dataset`; with fraction 0 and no eval dataset
    the dataset itself, None and no clip. `eval_datasets`: the labels of the eval-only datasets, whose clips are
    all held out. A cached dataset splits into two cached datasets over the same cache (the training one keeps its
    bucket-grouped batch sampler); any other into two IndexSubsets."""
    if fraction == 0 and not eval_datasets:
        return dataset, None, frozenset()
    ids = dataset_clip_ids(dataset)
    records = getattr(dataset, "records", None)
    if eval_datasets and records is None:
        raise HoldoutError(f"{DATASETS_KEY} is read through the feature cache, but this run was given a dataset "
                           "without one: remove the eval datasets or let the run fill its cache")
    labels = [r.dataset for r in records] if records is not None else [""] * len(ids)
    held = held_out_ids(list(zip(ids, labels, strict=True)), fraction, seed, eval_datasets)
    train = [i for i, c in enumerate(ids) if c not in held]
    evaluate = [i for i, c in enumerate(ids) if c in held]
    plan = getattr(dataset, "plan", None)
    if plan is not None and records is not None:
        from engine.data.dataset import CachedWindowDataset

        def part(indices: list[int]):
            kept = tuple(records[i] for i in indices)
            return CachedWindowDataset(dataclasses.replace(plan, records=kept), dataset.store)

        return part(train), part(evaluate), held
    return IndexSubset(dataset, train), IndexSubset(dataset, evaluate), held
