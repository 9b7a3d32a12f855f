"""The training dataset over the cache: sample contract, collate, deterministic order, exact resume."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from engine.data.cache import CacheStore
from engine.data.cache_plan import CachePlan, ReferenceSource, WindowRecord
from engine.data.dataset import (CachedWindowDataset, DataPosition, WindowBatchSampler, collate_windows,
                                 fill_cache)
from engine.data.synth import make_talking_clip
from engine.data.windows import Window
from test_cache_fill import make_config


def fake_plan(spec: dict[str, tuple[int, int, float]], motion_every: int = 0) -> CachePlan:
    """Records only (no cache): {dataset: (windows, repeats, weight)}; every `motion_every`-th has motion."""
    records, n = [], 0
    for name, (count, repeats, weight) in spec.items():
        for i in range(count):
            motion = 5 if motion_every and n % motion_every == 0 else 0
            records.append(WindowRecord(clip_id=f"{name}/c{i}.mp4", dataset=name, video=Path(f"{name}/c{i}.mp4"),
                                        window=Window(start=8 * i, frames=8, motion_frames=motion), bucket=(64, 48),
                                        reference=ReferenceSource(video=Path("x"), frame=0), repeats=repeats,
                                        weight=weight, window_key=f"{n:064x}", reference_key="0" * 64,
                                        audio_key="0" * 64, text_key="0" * 64))
            n += 1
    return CachePlan(root=Path("/nonexistent"), records=tuple(records), empty_text_key="0" * 64)


def take(sampler: WindowBatchSampler, n: int) -> list[list[tuple[int, int, int]]]:
    it = iter(sampler)
    return [[tuple(ref) for ref in next(it)] for _ in range(n)]


def test_order_is_a_function_of_seed_and_epoch():
    plan = fake_plan({"a": (7, 1, 1.0)})
    s1, s2 = WindowBatchSampler(plan, 2, seed=5), WindowBatchSampler(plan, 2, seed=5)
    assert take(s1, 12) == take(s2, 12)
    assert s1.epoch_order(0) != s1.epoch_order(1)  # reshuffled every epoch
    assert WindowBatchSampler(plan, 2, seed=6).epoch_order(0) != s1.epoch_order(0)
    assert sorted(s1.epoch_order(3)) == list(range(7))  # one dataset: a permutation of every window


def test_repeats_and_weights_set_the_epoch_mix():
    plan = fake_plan({"small": (2, 3, 1.0), "big": (6, 1, 3.0)})
    sampler = WindowBatchSampler(plan, 1, seed=0)
    order = sampler.epoch_order(0)
    assert len(order) == 2 * 3 + 6  # repeats make the epoch
    per_dataset = Counter(plan.records[i].dataset for i in order)
    assert per_dataset == {"small": 3, "big": 9}  # 12 samples split 1:3 by weight
    big = Counter(i for i in order if plan.records[i].dataset == "big")
    assert max(big.values()) - min(big.values()) <= 1  # cycled through shuffled passes, not drawn at random


def test_batches_never_mix_shape_groups():
    plan = fake_plan({"a": (9, 1, 1.0)}, motion_every=3)
    sampler = WindowBatchSampler(plan, 2, seed=1)
    batches = sampler.epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(9))
    for b in batches:
        assert len({plan.records[i].group for i in b}) == 1


def test_resume_continues_the_same_batches():
    plan = fake_plan({"a": (5, 2, 1.0), "b": (3, 1, 2.0)})
    run = take(WindowBatchSampler(plan, 2, seed=3), 20)  # crosses several epochs
    state = WindowBatchSampler(plan, 2, seed=3).state_dict(DataPosition(*run[12][0][1:]).next())
    resumed = WindowBatchSampler(plan, 2, seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 7) == run[13:20]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dataset")
    for i in range(2):
        make_talking_clip(root / "ds", f"clip_{i}", fps=16, size=(64, 48), duration_s=2.0, seed=10 + i,
                          use_espeak=False, caption="" if i else "A calm speaker.")
    config = make_config(root / "ds", root / "cache", tiny_model_dir, frames=8, motion_frames=5, windows_per_clip=2)
    config.data.datasets[0].repeats = 2
    seen = []
    plan = fill_cache(config, seen.append, device="cpu")
    assert {p.phase for p in seen} == {"check", "vae", "audio", "text"}
    return plan


def test_sample_contract(cached):
    data = CachedWindowDataset(cached)
    assert len(data) == 4
    first, cont = data[0], data[1]
    assert set(cont) == {"latents", "motion_latents", "ref_latents", "text", "text_empty", "audio", "clip_id",
                         "window"}
    assert cont["latents"].shape == (16, 2, 6, 8) and cont["motion_latents"].shape == (16, 2, 6, 8)
    assert first["motion_latents"] is None and cont["window"] == Window(start=24, frames=8, motion_frames=5)
    assert cont["ref_latents"].shape == (16, 1, 6, 8) and cont["audio"].shape == (3, 32, 8)
    assert cont["clip_id"] == "ds/clip_0.mp4"
    _, meta = CacheStore(cached.root).read("text", cached.records[0].text_key)
    n = int(meta["length"])
    assert n > 1 and cont["text"][:n].abs().sum(-1).min() > 0 and cont["text"][n:].abs().sum() == 0
    assert torch.equal(data[2]["text"], data[2]["text_empty"])  # clip_1's caption is empty


def test_collate_stacks_one_group_and_refuses_mixed(cached):
    data = CachedWindowDataset(cached)
    batch = collate_windows([data[1], data[3]])
    assert batch["latents"].shape == (2, 16, 2, 6, 8) and batch["motion_latents"].shape == (2, 16, 2, 6, 8)
    assert batch["audio"].shape == (2, 3, 32, 8) and batch["text"].shape == (2, 512, 32)
    assert batch["clip_id"] == ["ds/clip_0.mp4", "ds/clip_1.mp4"]
    assert collate_windows([data[0], data[2]])["motion_latents"] is None
    with pytest.raises(ValueError, match="WindowBatchSampler"):
        collate_windows([data[0], data[1]])


def test_loader_resume_is_bit_for_bit(cached):
    """Prefetching workers do not disturb the saved position: the resumed loader yields the same tensors."""
    data = CachedWindowDataset(cached)

    def loader(sampler):
        return DataLoader(data, batch_sampler=sampler, collate_fn=collate_windows, num_workers=2,
                          prefetch_factor=4)

    full = []
    for batch in loader(WindowBatchSampler(cached, 2, seed=7)):
        full.append(batch)
        if len(full) == 9:
            break
    saved = WindowBatchSampler(cached, 2, seed=7).state_dict(full[4]["position"].next())
    sampler = WindowBatchSampler(cached, 2, seed=7)
    sampler.load_state_dict(saved)
    for expected, got in zip(full[5:], loader(sampler)):
        assert got["position"] == expected["position"] and got["clip_id"] == expected["clip_id"]
        for name in ("latents", "ref_latents", "text", "audio"):
            assert torch.equal(got[name], expected[name])
        if got["position"] == full[-1]["position"]:
            break


def test_incomplete_or_empty_plan_is_refused(cached):
    from dataclasses import replace

    with pytest.raises(ValueError, match="s2v-tui cache"):
        CachedWindowDataset(replace(cached, complete=False))
    with pytest.raises(ValueError, match="no training windows"):
        CachedWindowDataset(replace(cached, records=()))
