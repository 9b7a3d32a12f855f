"""CREPA's DINOv2 features in the cache (tiny model and tiny DINOv2, CPU): computed once, keyed by the encoder."""
from __future__ import annotations

import threading

import pytest
import torch

from engine.config import with_value
from engine.data import crepa_features
from engine.data.cache import CacheStore
from engine.data.cache_fill import fill_cache
from engine.data.dataset import CachedWindowDataset
from engine.models.tiny import write_tiny_dinov2
from engine.runner import run
from s2v_tui.commands.demo import demo_config, make_demo_clips


@pytest.fixture(scope="module")
def crepa_cache(tiny_model_dir, tmp_path_factory):
    """The demo's clips and settings with CREPA on, the cache filled once."""
    root = tmp_path_factory.mktemp("crepa")
    clips = make_demo_clips(root / "clips")
    config = demo_config(tiny_model_dir, root / "runs", clips, root / "cache")
    for key, value in {"crepa.enabled": True, "crepa.block_index": 1,
                       "crepa.encoder": str(tiny_model_dir / "dinov2"), "optim.warmup_steps": 0}.items():
        config = with_value(config, key, value)
    return config, fill_cache(config, device="cpu")


def test_every_window_gets_its_features_per_target_latent(crepa_cache):
    _, plan = crepa_cache
    assert plan.records and all(r.crepa_key for r in plan.records)
    data = CachedWindowDataset(plan)
    for i in range(len(data)):
        sample = data[i]
        # 20 target latents; the 64x64 bucket has 4x4 tokens, so a 2x2 DINOv2 grid; the tiny DINOv2 is 16 wide.
        assert sample["crepa"].shape == (sample["latents"].shape[1], 2, 2, 16)
        assert torch.isfinite(sample["crepa"].float()).all()


def test_the_features_are_those_of_the_windows_new_frames(crepa_cache, tiny_model_dir):
    from engine.data import media
    from engine.data.windows import MODEL_FPS

    config, plan = crepa_cache
    record = next(r for r in plan.records if r.window.has_motion)
    store = CacheStore(plan.root)
    cached = store.read("crepa", record.crepa_key)[0]["features"]
    # Recompute from the window's decoded new frames with the same encoder: the cached entry is exactly that (bf16).
    from engine.data.cache_plan import dataset_specs, doctor_settings
    from engine.data.doctor import inspect_datasets

    report = inspect_datasets(dataset_specs(config), doctor_settings(config))
    crop = next(c.plan.crop for c in report.clips if c.clip.video == record.video)
    frames = media.decode_frames(record.video, record.window.frame_times_s(MODEL_FPS, with_motion=False), crop)
    encoder = crepa_features.load_encoder(tiny_model_dir / "dinov2", torch.device("cpu"))
    expected = crepa_features.window_features(encoder, frames, (2, 2))
    assert torch.equal(cached, expected.to(cached.dtype))


def test_a_second_fill_loads_no_encoder_and_another_encoder_recomputes_only_features(crepa_cache, tmp_path,
                                                                                    monkeypatch):
    config, plan = crepa_cache

    def no_load(*_a, **_k):
        raise AssertionError("the DINOv2 encoder was loaded although every feature is cached")

    monkeypatch.setattr(crepa_features, "load_encoder", no_load)
    again = fill_cache(config, device="cpu")
    assert [r.crepa_key for r in again.records] == [r.crepa_key for r in plan.records]
    monkeypatch.undo()

    other = write_tiny_dinov2(tmp_path / "dinov2-other", seed=5)
    changed = with_value(config, "crepa.encoder", str(other))
    store = CacheStore(config.cache_path())
    before = {k: store.keys(k) for k in ("window", "reference", "audio", "text", "crepa")}
    replanned = fill_cache(changed, device="cpu")
    after = {k: store.keys(k) for k in before}
    assert all(after[k] == before[k] for k in ("window", "reference", "audio", "text"))
    new = {r.crepa_key for r in replanned.records}
    assert new.isdisjoint({r.crepa_key for r in plan.records}) and new <= after["crepa"]


def test_a_run_with_crepa_trains_from_the_cache(crepa_cache, tmp_path):
    config, _ = crepa_cache
    config = with_value(config, "optim.max_steps", 3)
    end = run(config, [], threading.Event(), run_dir=tmp_path / "run", device="cpu")
    assert end.status == "completed", end.reason


def test_an_encoder_that_is_not_dinov2_is_refused_by_its_key(tiny_model_dir):
    with pytest.raises(ValueError, match="crepa.encoder .*model_type"):
        crepa_features.feature_dim(str(tiny_model_dir / "text_encoder"))
    with pytest.raises(FileNotFoundError, match="crepa.encoder"):
        crepa_features.feature_dim(str(tiny_model_dir / "nothing-here"))


def test_cache_prune_keeps_the_features_a_crepa_config_uses_and_drops_them_without_crepa(crepa_cache, tmp_path,
                                                                                         capsys):
    import shutil

    from engine.config import save_config
    from s2v_tui.commands.cache import main

    config, plan = crepa_cache
    shutil.copytree(config.cache_path(), tmp_path / "cache")
    config = with_value(config, "data.cache_dir", str(tmp_path / "cache"))
    store = CacheStore(tmp_path / "cache")
    used = {r.crepa_key for r in plan.records}
    extra = store.keys("crepa") - used  # features of another encoder (an earlier test) go with --prune
    assert main([str(save_config(config, tmp_path / "on.toml")), "--device", "cpu", "--prune"]) == 0
    assert f"pruned {len(extra)} entries" in capsys.readouterr().out
    assert store.keys("crepa") == used
    off = with_value(config, "crepa.enabled", False)
    assert main([str(save_config(off, tmp_path / "off.toml")), "--device", "cpu", "--prune"]) == 0
    assert f"pruned {len(used)} entries" in capsys.readouterr().out
    assert store.keys("crepa") == set() and store.keys("window")
