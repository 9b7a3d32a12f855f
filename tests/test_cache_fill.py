"""Filling the cache on the tiny model: frame semantics, audio alignment, invalidation, interrupted writes.

Most tests use short windows (8 new frames after 5 motion frames: the same 4k+1 arithmetic as 80 after 73)
so the tiny VAE stays fast on a CPU; one test runs the model's own 80/73 windows.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from engine.config import Config, DatasetEntry
from engine.data import cache as cache_mod
from engine.data import media
from engine.data.cache import CacheStore
from engine.data.cache_fill import fill_cache, plan_cache
from engine.data.dataset import CachedWindowDataset
from engine.data.synth import make_talking_clip
from engine.data.windows import MODEL_FPS, CropPlan, audio_features_per_frame




SMALL = dict(frames=8, motion_frames=5, windows_per_clip=2)


def make_config(dataset: Path, cache_dir: Path, model: Path, *, resolution=(64, 48), **data) -> Config:
    config = Config()
    config.model.source = str(model)
    config.data.datasets = [DatasetEntry(path=str(dataset))]
    config.data.resolution = resolution
    config.data.cache_dir = str(cache_dir)
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def entries(cache_dir: Path) -> dict[Path, int]:
    """Every entry file with its inode: a rewritten entry gets a new inode (temp file + rename)."""
    return {p: p.stat().st_ino for p in (cache_dir / "entries").rglob("*.safetensors")}


def rebuilt(before: dict[Path, int], after: dict[Path, int]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p, ino in after.items():
        if before.get(p) != ino:
            out.setdefault(p.parent.parent.name, set()).add(p.stem)
    return out


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_model_dir):
    """Three 2 s clips (25 fps sources), two windows each (one with motion frames), cache filled once."""
    root = tmp_path_factory.mktemp("small")
    for i in range(3):
        make_talking_clip(root / "ds", f"clip_{i}", fps=25, size=(64, 48), duration_s=2.0, seed=i,
                          use_espeak=False, caption=f"Speaker {i} talks calmly.")
    config = make_config(root / "ds", root / "cache", tiny_model_dir, **SMALL)
    plan = fill_cache(config, device="cpu")
    return root, plan


@pytest.fixture
def copy_of(small_cache, tmp_path, tiny_model_dir):
    """A private copy of the small dataset and its filled cache, and its config."""
    root, _ = small_cache
    shutil.copytree(root / "ds", tmp_path / "ds")
    shutil.copytree(root / "cache", tmp_path / "cache")
    return tmp_path, make_config(tmp_path / "ds", tmp_path / "cache", tiny_model_dir, **SMALL)


def test_small_plan_has_first_and_continuation_windows(small_cache):
    _, plan = small_cache
    assert plan.complete and not plan.skipped
    assert [(r.clip_id, r.window.start, r.window.motion_frames) for r in plan.records] == [
        (f"ds/clip_{i}.mp4", s, m) for i in range(3) for s, m in ((0, 0), (24, 5))]
    data = CachedWindowDataset(plan)
    first, cont = data[0], data[1]
    assert first["motion_latents"] is None and first["latents"].shape == (16, 2, 6, 8)
    assert cont["motion_latents"].shape == (16, 2, 6, 8) and cont["audio"].shape == (3, 32, 8)


def test_touch_rebuilds_nothing(copy_of):
    root, config = copy_of
    before = entries(root / "cache")
    clip = root / "ds" / "clip_1.mp4"
    st = clip.stat()
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    fill_cache(config, device="cpu")
    assert rebuilt(before, entries(root / "cache")) == {}


def test_modified_clip_rebuilds_only_its_entries(copy_of):
    root, config = copy_of
    before = entries(root / "cache")
    make_talking_clip(root / "ds", "clip_1", fps=25, size=(64, 48), duration_s=2.0, seed=99, use_espeak=False,
                      caption="Speaker 1 talks calmly.")
    plan = fill_cache(config, device="cpu")
    new = rebuilt(before, entries(root / "cache"))
    mine = [r for r in plan.records if r.clip_id == "ds/clip_1.mp4"]
    assert new == {"window": {r.window_key for r in mine}, "reference": {mine[0].reference_key},
                   "audio": {r.audio_key for r in mine}}  # its caption is unchanged: no text entry


def test_cache_command_on_a_resolution_change_rebuilds_only_latents_and_prunes(copy_of, capsys):
    from s2v_tui.commands.cache import main

    root, config = copy_of
    before = entries(root / "cache")
    preset = root / "run.toml"
    preset.write_text(f"""
[model]
source = "{config.model.source}"
[data]
resolution = [32, 32]
frames = 8
motion_frames = 5
windows_per_clip = 2
cache_dir = "{root / 'cache'}"
[[data.datasets]]
path = "{root / 'ds'}"
""", encoding="utf-8")
    assert main([str(preset), "--device", "cpu", "--prune"]) == 0
    out = capsys.readouterr().out
    assert "VAE latents: 9/9" in out and "6 windows from 3 clips (3 with motion frames)" in out
    assert "pruned 9 entries" in out  # the 64x48 latents of the 6 windows and 3 references
    after = entries(root / "cache")
    new = rebuilt(before, after)
    assert set(new) == {"window", "reference"} and len(new["window"]) == 6 and len(new["reference"]) == 3
    assert set(before) - set(after) == {p for p in before if p.parent.parent.name in ("window", "reference")}
    config.data.resolution = (32, 32)
    assert CachedWindowDataset(fill_cache(config, device="cpu"))[1]["latents"].shape == (16, 2, 4, 4)
    assert main([str(root / "missing.toml")]) == 2


def test_caption_change_rebuilds_only_its_text(copy_of):
    root, config = copy_of
    before = entries(root / "cache")
    (root / "ds" / "clip_2.txt").write_text("Someone else entirely.\n", encoding="utf-8")
    plan = fill_cache(config, device="cpu")
    assert rebuilt(before, entries(root / "cache")) == {"text": {plan.records[-1].text_key}}


def test_another_vae_never_reuses_latents(copy_of, tiny_model_dir, tmp_path):
    _, config = copy_of
    work, _, _ = plan_cache(config)
    assert not (work.windows or work.references or work.audio or work.texts)
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    weights = next((other / "vae").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight: same config, same file size, another model
    weights.write_bytes(bytes(data))
    config.model.source = str(other)
    work, _, _ = plan_cache(config)
    assert len(work.windows) == 6 and len(work.references) == 3  # every latent entry is new
    assert not work.audio and not work.texts  # the audio and text encoders did not change


def test_interrupted_write_is_recomputed_not_read(copy_of, monkeypatch):
    root, config = copy_of
    config.data.resolution = (32, 32)  # new latent entries to write
    real_commit, calls = cache_mod.commit_temp, []

    def dies_on_third(temp, final):
        calls.append(final)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed after writing the temp file")
        real_commit(temp, final)

    monkeypatch.setattr(cache_mod, "commit_temp", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        fill_cache(config, device="cpu")
    monkeypatch.undo()
    lost = calls[2]
    assert not lost.exists()  # the entry was never put in place
    store = CacheStore(root / "cache")
    with pytest.raises(FileNotFoundError):
        store.read(lost.parent.parent.name, lost.stem)
    before = entries(root / "cache")
    plan = fill_cache(config, device="cpu")
    after = entries(root / "cache")
    assert lost in after and set(before) < set(after)
    assert all(after[p] == ino for p, ino in before.items())  # what was written before is not redone
    data = CachedWindowDataset(plan)
    assert all(data[i]["latents"].shape == (16, 2, 4, 4) for i in range(len(data)))


def test_model_windows_targets_motion_split_and_audio_columns(tmp_path, tiny_model_dir):
    """80 new frames after 73: targets = encode(73 + 80)[19:], features = the window's columns of its span."""
    make_talking_clip(tmp_path / "ds", "talk", fps=25, size=(32, 32), duration_s=10.5, seed=3, use_espeak=False)
    config = make_config(tmp_path / "ds", tmp_path / "cache", tiny_model_dir, resolution=(32, 32),
                         windows_per_clip=0)
    plan = fill_cache(config, device="cpu")
    assert [(r.window.start, r.window.motion_frames) for r in plan.records] == [(0, 0), (80, 73)]
    data = CachedWindowDataset(plan)
    first, cont = data[0], data[1]
    assert first["latents"].shape == (16, 20, 4, 4) and first["motion_latents"] is None
    assert cont["latents"].shape == (16, 20, 4, 4) and cont["motion_latents"].shape == (16, 19, 4, 4)
    assert cont["ref_latents"].shape == (16, 1, 4, 4) and cont["audio"].shape == (3, 32, 80)
    assert cont["text"].shape == (512, 32) and cont["text_empty"].shape == (512, 32)
    assert cont["text_empty"][1:].abs().sum() == 0 and cont["text_empty"][0].abs().sum() > 0  # EOS only

    from engine.models.components import encode_video, load_audio_encoder, load_vae, wav2vec2_hidden_states

    record, video = plan.records[1], tmp_path / "ds" / "talk.mp4"
    assert record.reference.frame == 0  # data.reference = "first"
    frames = media.decode_frames(video, record.window.frame_times_s(MODEL_FPS, with_motion=True),
                                 CropPlan(32, 32, 0, 0, 32, 32))
    assert frames.shape[0] == 153
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    z = encode_video(load_vae(tiny_model_dir), pixels)[0]
    assert z.shape[1] == 39
    torch.testing.assert_close(cont["motion_latents"], z[:, :19])
    torch.testing.assert_close(cont["latents"], z[:, 19:])

    start_s, end_s = record.window.audio_span_s()
    wave = media.decode_audio(video, start_s, end_s - start_s).samples
    hidden = wav2vec2_hidden_states(*load_audio_encoder(tiny_model_dir), wave)
    expected = audio_features_per_frame(hidden, first_frame=73, num_frames=80)
    torch.testing.assert_close(cont["audio"], expected.to(torch.bfloat16), atol=1e-2, rtol=1e-2)
    # Column by column: frame 73 + k of the span is the window's frame k.
    span = audio_features_per_frame(hidden, first_frame=0, num_frames=153)
    torch.testing.assert_close(cont["audio"][..., 5].float(), span[..., 78], atol=1e-2, rtol=1e-2)


def test_silent_clip_reference_image_and_stop(tmp_path, tiny_model_dir):
    """Zero features for a clip allowed to train without audio; a metadata reference image is encoded
    fitted to the bucket; a stop mid-way keeps what was written and the next fill finishes the rest."""
    import json
    import threading

    import numpy as np
    from PIL import Image

    from engine.models.components import encode_video, load_vae

    ds = tmp_path / "ds"
    make_talking_clip(ds, "mute", fps=16, size=(64, 48), duration_s=1.0, audio="none", use_espeak=False)
    make_talking_clip(ds, "face", fps=16, size=(64, 48), duration_s=1.0, seed=4, use_espeak=False)
    image = np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8)  # wider than the bucket
    Image.fromarray(image).save(ds / "face_ref.png")
    (ds / "metadata.jsonl").write_text(json.dumps({"file_name": "face.mp4", "caption": "A face.",
                                                   "reference_image": "face_ref.png"}) + "\n")
    config = make_config(ds, tmp_path / "cache", tiny_model_dir, allow_silent_audio=True, **SMALL)

    stop, seen = threading.Event(), []

    def progress(p):
        seen.append(p.phase)
        if p.phase == "vae":
            stop.set()  # stop after the first written batch

    plan = fill_cache(config, progress, device="cpu", stop=stop)
    assert not plan.complete and "audio" not in seen
    with pytest.raises(ValueError, match="s2v-tui cache"):
        CachedWindowDataset(plan)
    plan = fill_cache(config, device="cpu")
    assert plan.complete and [r.clip_id for r in plan.records] == ["ds/face.mp4"] * 2 + ["ds/mute.mp4"] * 2
    data = CachedWindowDataset(plan)
    assert data[3]["audio"].shape == (3, 32, 8) and data[3]["audio"].abs().sum() == 0
    assert data[0]["audio"].abs().sum() > 0
    # 160x96 scaled to cover 64x48 is 80x48, centre-cropped to columns 8..72.
    fitted = np.array(Image.fromarray(image).resize((80, 48), Image.Resampling.BICUBIC))[:, 8:72]
    pixels = torch.from_numpy(fitted).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0
    torch.testing.assert_close(data[0]["ref_latents"], encode_video(load_vae(tiny_model_dir), pixels)[0])


def test_plan_carries_the_warnings_of_the_clips_that_train(tmp_path, tiny_model_dir):
    """The run shows what `s2v-tui check` warns about: the plan lists every non-blocking problem of a clip it
    keeps (a 1 MB caption cut to 512 tokens, audio shorter than the video), and none of a clean clip."""
    ds = tmp_path / "ds"
    essay = make_talking_clip(ds, "essay", fps=25, size=(64, 48), duration_s=1.0, use_espeak=False,
                              caption=("the speaker keeps talking about the weather " * 24000)[:1_000_000])
    short = make_talking_clip(ds, "short_audio", fps=25, size=(64, 48), duration_s=2.0, audio="pcm",
                              audio_duration_s=1.2, use_espeak=False)
    make_talking_clip(ds, "clean", fps=25, size=(64, 48), duration_s=1.0, use_espeak=False)
    config = make_config(ds, tmp_path / "cache", tiny_model_dir, **SMALL)
    work, _, _ = plan_cache(config)
    plan = work.plan
    assert {r.video.stem for r in plan.records} == {"essay", "short_audio", "clean"}
    found = {(video.name, problem.code) for video, problem in plan.warnings}
    assert found == {(essay.video.name, "caption-too-long"), (short.video.name, "duration-mismatch")}
    assert all(not problem.blocking for _, problem in plan.warnings)


def _no_encoder(monkeypatch):
    from engine.models import components

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was loaded for a dataset with nothing to train on")

    for name in ("load_vae", "load_text_encoder", "load_audio_encoder"):
        monkeypatch.setattr(components, name, refuse)


def test_empty_dataset_fails_before_any_encoder_loads(tmp_path, tiny_model_dir, monkeypatch):
    from engine.config import ConflictError

    _no_encoder(monkeypatch)
    (tmp_path / "empty").mkdir()
    config = make_config(tmp_path / "empty", tmp_path / "cache", tiny_model_dir, **SMALL)
    with pytest.raises(ConflictError) as info:
        fill_cache(config, device="cpu")
    assert str(tmp_path / "empty") in str(info.value) and "no usable training window" in str(info.value)
    assert info.value.key == "data.datasets[0].path" and "dataset-empty" in str(info.value)


def test_dataset_whose_clips_are_all_left_out_fails_before_any_encoder_loads(tmp_path, tiny_model_dir, monkeypatch):
    from engine.config import ConflictError

    _no_encoder(monkeypatch)
    make_talking_clip(tmp_path / "a", "blip", fps=25, size=(64, 48), duration_s=0.2, use_espeak=False)
    (tmp_path / "b").mkdir()
    config = make_config(tmp_path / "a", tmp_path / "cache", tiny_model_dir, **SMALL)
    config.data.datasets.append(DatasetEntry(path=str(tmp_path / "b")))
    with pytest.raises(ConflictError) as info:
        fill_cache(config, device="cpu")
    text = str(info.value)
    assert f"{tmp_path / 'a'}, {tmp_path / 'b'}" in text and "the only clip is left out (too-few-frames x1)" in text
