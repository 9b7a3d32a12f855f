"""validation.eval_loss.holdout: which clips are held out (seed and clip ids alone), that none of them is ever in a
training batch, that the eval loss measures only them, the refusals, and what `s2v-tui check` lists."""
from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch
from test_cache_dataset import fake_plan

from engine.config import Config, DatasetEntry, check_config, with_value
from engine.data.cache import CacheStore
from engine.data.dataset import CachedWindowDataset, fill_cache
from engine.data.holdout import HoldoutError, IndexSubset, held_out_clips, split_dataset
from engine.data.synth import make_talking_clip
from engine.runner import run
from engine.train import batches, validation
from engine.train.batches import order_for
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands import check as check_cmd
from s2v_tui.commands.demo import demo_config


def test_the_choice_is_a_function_of_seed_and_clip_ids():
    ids = [f"d/clip-{i}.mp4" for i in range(20)]
    held = held_out_clips(ids, 0.25, seed=7)
    assert len(held) == 5 and held <= set(ids)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert held_out_clips(shuffled + ids[:3], 0.25, seed=7) == held  # order and repeated windows do not matter
    assert held_out_clips(ids, 0.25, seed=8) != held  # the seed picks
    # One more clip moves at most one clip across the cut (a shuffle of the list would move many).
    grown = held_out_clips(ids + ["d/new.mp4"], 0.25, seed=7)
    assert len(grown - held) <= 1
    assert held_out_clips(ids, 0.0, seed=7) == frozenset()


def test_a_holdout_that_empties_either_side_is_refused():
    with pytest.raises(HoldoutError, match=r"validation\.eval_loss\.holdout = 0\.1 of 3 clip\(s\) holds out no "
                                           r"clip.*at least 0\.17"):
        held_out_clips(["a", "b", "c"], 0.1, seed=0)
    with pytest.raises(HoldoutError, match="holds out every clip, so nothing would train"):
        held_out_clips(["a", "b"], 0.9, seed=0)
    assert len(held_out_clips(["a", "b"], 0.5, seed=0)) == 1


def test_config_rules():
    config = Config()
    config.validation.eval_loss.holdout = 1.0
    assert any(e.key == "validation.eval_loss.holdout" for e in check_config(config))
    config.validation.eval_loss.holdout = 0.2  # in range, but the eval loss never runs: clips lost for nothing
    errors = [e for e in check_config(config) if e.key == "validation.eval_loss.holdout"]
    assert errors and "never measured" in str(errors[0])
    config.validation.eval_loss.enabled = True
    config.validation.every_steps = 5
    assert not [e for e in check_config(config) if e.key == "validation.eval_loss.holdout"]


def test_a_cached_dataset_splits_into_two_over_the_same_cache(tmp_path):
    plan = fake_plan({"a": (6, 1, 1.0), "b": (4, 2, 1.0)})
    data = CachedWindowDataset(plan, CacheStore(tmp_path))
    train, held_out, clips = split_dataset(data, 0.3, seed=3)
    assert len(clips) == 3
    assert {r.clip_id for r in held_out.records} == clips
    assert not {r.clip_id for r in train.records} & clips
    assert len(train) + len(held_out) == len(data)
    order = order_for(train, 2, seed=0)  # the training part keeps the bucket-grouped sampler, over its windows only
    drawn = {train.records[i].clip_id for _ in range(20) for i in order.next_indices()}
    assert drawn == {r.clip_id for r in train.records}
    plain_train, plain_held, plain_clips = split_dataset(SyntheticLatentDataset(5), 0.4, seed=3)
    assert isinstance(plain_train, IndexSubset) and len(plain_clips) == 2 and len(plain_held) == 2


def _config(model_dir, tmp_path, **settings):
    config = with_value(demo_config(model_dir, tmp_path / "runs"), "optim.warmup_steps", 0)
    for key, value in settings.items():
        config = with_value(config, key, value)
    return config


def test_held_out_clips_never_train_and_are_what_the_eval_loss_measures(tiny_model_dir, tmp_path, monkeypatch):
    trained: list[str] = []
    measured: list[str] = []
    real_collate, real_eval = batches.collate, validation.evaluation_losses

    def recording_collate(samples, caption_drop, motion_drop):
        batch = real_collate(samples, caption_drop, motion_drop)
        trained.extend(batch.clip_ids)
        return batch

    def recording_eval(model, dataset, triples, *args, **kwargs):
        measured.extend(dataset[t.index]["clip_id"] for t in triples)
        return real_eval(model, dataset, triples, *args, **kwargs)

    monkeypatch.setattr(batches, "collate", recording_collate)
    monkeypatch.setattr(validation, "evaluation_losses", recording_eval)
    config = _config(tiny_model_dir, tmp_path, **{
        "optim.max_steps": 12, "validation.every_steps": 4, "validation.eval_loss.enabled": True,
        "validation.eval_loss.num_triples": 4, "validation.eval_loss.holdout": 0.4})
    losses = []
    end = run(config, [lambda e: e.kind == "validation_done" and losses.append(e.eval_loss)], threading.Event(),
              run_dir=tmp_path / "run", dataset=SyntheticLatentDataset(5), device="cpu")
    assert end.status == "completed", end.reason
    held = held_out_clips([f"synthetic-{i}" for i in range(5)], 0.4, config.train.seed)
    assert len(held) == 2
    assert len(trained) == 12 * config.optim.batch_size * config.optim.grad_accum
    assert not set(trained) & held, "a held-out clip was in a training batch"
    assert set(trained) == {f"synthetic-{i}" for i in range(5)} - held  # every other clip did train
    assert measured and set(measured) == held
    assert len(losses) == 3 and all(loss is not None for loss in losses)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "held out of training for the eval loss: 2 clip(s)" in log


def test_a_run_whose_holdout_leaves_no_eval_clip_is_refused(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, **{
        "optim.max_steps": 2, "validation.every_steps": 1, "validation.eval_loss.enabled": True,
        "validation.eval_loss.holdout": 0.1})
    end = run(config, [], threading.Event(), run_dir=tmp_path / "run", dataset=SyntheticLatentDataset(2),
              device="cpu")
    assert end.status == "failed"
    assert "validation.eval_loss.holdout = 0.1 of 2 clip(s) holds out no clip" in end.reason


def test_check_lists_the_clips_the_run_holds_out(tmp_path, tiny_model_dir, capsys):
    for i in range(4):
        make_talking_clip(tmp_path / "clips", f"c{i}", fps=25, size=(64, 48), duration_s=1.0, seed=i,
                          use_espeak=False, caption=f"Speaker {i}.")
    preset = tmp_path / "run.toml"
    preset.write_text(
        f'[model]\nsource = "{tiny_model_dir}"\n[data]\nresolution = [64, 48]\nframes = 8\nmotion_frames = 5\n'
        f'windows_per_clip = 1\ncache_dir = "{tmp_path / "cache"}"\n[[data.datasets]]\npath = "{tmp_path / "clips"}"\n'
        '[validation]\nevery_steps = 2\n[validation.eval_loss]\nenabled = true\nholdout = 0.5\n')
    assert check_cmd.main([str(preset), "--json"]) == check_cmd.EXIT_OK
    listed = json.loads(capsys.readouterr().out)["held_out"]
    assert len(listed) == 2
    # The run's split of the filled cache holds out the very clips the check lists.
    config = Config()
    config.model.source = str(tiny_model_dir)
    config.data.datasets = [DatasetEntry(path=str(tmp_path / "clips"))]
    config.data.resolution, config.data.frames, config.data.motion_frames = (64, 48), 8, 5
    config.data.windows_per_clip, config.data.cache_dir = 1, str(tmp_path / "cache")
    train, held_out, clips = split_dataset(CachedWindowDataset(fill_cache(config, device="cpu")), 0.5,
                                           config.train.seed)
    assert sorted(clips) == listed
    assert not {r.clip_id for r in train.records} & clips
    assert Path(held_out.records[0].video).exists()  # cached like the others: the entries it reads exist
    held_out[0]
    check_cmd.main([str(preset)])
    assert f"2 of 4 clips: {', '.join(listed)}" in capsys.readouterr().out
    preset.write_text(preset.read_text().replace("holdout = 0.5", "holdout = 0.1"))
    assert check_cmd.main([str(preset)]) == check_cmd.EXIT_PROBLEMS
    assert "holds out no clip" in capsys.readouterr().out


def _talking(folder: Path, count: int, seed: int = 0) -> None:
    for i in range(count):
        make_talking_clip(folder, f"c{i}", fps=25, size=(64, 64), duration_s=1.0, seed=seed + i, use_espeak=False,
                          caption=f"Speaker {seed + i}.")


def test_eval_datasets_are_cached_never_trained_and_all_the_eval_loss_measures(tiny_model_dir, tmp_path,
                                                                               monkeypatch, capsys):
    _talking(tmp_path / "train", 3)
    _talking(tmp_path / "heldout", 2, seed=10)
    trained: list[str] = []
    measured: list[str] = []
    real_collate, real_eval = batches.collate, validation.evaluation_losses

    def recording_collate(samples, caption_drop, motion_drop):
        trained.extend(s["clip_id"] for s in samples)
        return real_collate(samples, caption_drop, motion_drop)

    def recording_eval(model, dataset, triples, *args, **kwargs):
        measured.extend(dataset[t.index]["clip_id"] for t in triples)
        return real_eval(model, dataset, triples, *args, **kwargs)

    monkeypatch.setattr(batches, "collate", recording_collate)
    monkeypatch.setattr(validation, "evaluation_losses", recording_eval)
    config = demo_config(tiny_model_dir, tmp_path / "runs", tmp_path / "train", tmp_path / "cache")
    for key, value in {"optim.max_steps": 6, "optim.warmup_steps": 0, "data.frames": 8, "data.motion_frames": 5,
                       "data.windows_per_clip": 1, "validation.every_steps": 3, "validation.eval_loss.enabled": True,
                       "validation.eval_loss.num_triples": 4,
                       "validation.eval_loss.datasets": [{"path": str(tmp_path / "heldout")}]}.items():
        config = with_value(config, key, value)
    end = run(config, [], threading.Event(), run_dir=tmp_path / "run", device="cpu")
    assert end.status == "completed", end.reason
    assert set(trained) == {f"train/c{i}.mp4" for i in range(3)}  # no eval clip in any training batch
    assert set(measured) == {"heldout/c0.mp4", "heldout/c1.mp4"}
    # Both folders went through the same cache: a second plan finds nothing to compute.
    from engine.data.cache_fill import plan_cache

    work, _, _ = plan_cache(config)
    assert not (work.windows or work.references or work.audio or work.texts)
    assert {r.dataset for r in work.plan.records} == {"train", "heldout"}
    # `s2v-tui check` names the same clips, and with a holdout too those of the training folder it picks.
    preset = tmp_path / "run.toml"
    from engine.config import save_config

    save_config(with_value(config, "validation.eval_loss.holdout", 0.34), preset)
    assert check_cmd.main([str(preset), "--json"]) == check_cmd.EXIT_OK
    listed = json.loads(capsys.readouterr().out)["held_out"]
    picked = held_out_clips([f"train/c{i}.mp4" for i in range(3)], 0.34, config.train.seed)
    assert listed == sorted({"heldout/c0.mp4", "heldout/c1.mp4"} | picked) and len(picked) == 1


def test_eval_dataset_rules(tmp_path):
    config = Config()
    config.data.datasets = [DatasetEntry(path=str(tmp_path / "a"))]
    config.validation.every_steps = 5
    config.validation.eval_loss.enabled = True
    config.validation.eval_loss.datasets = [DatasetEntry(path=str(tmp_path / "a")), DatasetEntry(path="b", repeats=2)]
    keys = {e.key for e in check_config(config)}
    assert {"validation.eval_loss.datasets[0].path", "validation.eval_loss.datasets[1].repeats"} <= keys
    config.validation.eval_loss.datasets = [DatasetEntry(path="b")]
    assert not {e.key for e in check_config(config)}
    config.validation.eval_loss.enabled = False
    assert "validation.eval_loss.datasets" in {e.key for e in check_config(config)}
    # A dataset given by the caller has no cache to read the eval clips from: refused, not ignored.
    with pytest.raises(HoldoutError, match="feature cache"):
        split_dataset(SyntheticLatentDataset(3), 0.0, 0, frozenset({"b"}))


def test_a_resumed_run_holds_out_the_same_clips_and_trains_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch):
    from engine.models.lora import load_lora

    trained: list[str] = []
    real_collate = batches.collate

    def recording_collate(samples, caption_drop, motion_drop):
        trained.extend(s["clip_id"] for s in samples)
        return real_collate(samples, caption_drop, motion_drop)

    monkeypatch.setattr(batches, "collate", recording_collate)
    config = _config(tiny_model_dir, tmp_path, **{
        "optim.max_steps": 8, "checkpoint.every_steps": 3, "validation.every_steps": 4,
        "validation.eval_loss.enabled": True, "validation.eval_loss.num_triples": 2,
        "validation.eval_loss.holdout": 0.4})
    ref = run(config, [], threading.Event(), run_dir=tmp_path / "ref", dataset=SyntheticLatentDataset(5),
              device="cpu")
    stop = threading.Event()

    def stop_at_5(event):
        if event.kind == "step_end" and event.step == 5:
            stop.set()

    assert run(config, [stop_at_5], stop, run_dir=tmp_path / "resumed", dataset=SyntheticLatentDataset(5),
               device="cpu").status == "stopped"
    resumed = run(config, [], threading.Event(), run_dir=tmp_path / "resumed", dataset=SyntheticLatentDataset(5),
                  device="cpu")
    assert ref.status == resumed.status == "completed", (ref.reason, resumed.reason)
    held = held_out_clips([f"synthetic-{i}" for i in range(5)], 0.4, config.train.seed)
    assert len(trained) == 8 + 8 and not set(trained) & held
    a, _ = load_lora(ref.outputs["peft"])
    b, _ = load_lora(resumed.outputs["peft"])
    assert all(torch.equal(a[k], b[k]) for k in a)
