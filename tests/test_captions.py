"""Per-dataset caption prefix (trigger word) and default caption: the text the model is given, the warning for a
clip without a caption file, what `s2v-tui check` shows, and the text cache keyed by the final caption."""
from __future__ import annotations

import json
from pathlib import Path

from engine.config import Config, DatasetEntry, check_config
from engine.data.cache_fill import fill_cache, plan_cache
from engine.data.discover import DatasetSpec, discover
from engine.data.synth import make_talking_clip
from s2v_tui.commands import check as check_cmd

SMALL = dict(frames=8, motion_frames=5, windows_per_clip=1)


def _clip(folder: Path, stem: str, caption: str | None, seed: int = 0) -> None:
    make_talking_clip(folder, stem, fps=25, size=(64, 48), duration_s=1.0, seed=seed, use_espeak=False,
                      caption=caption)


def test_prefix_and_default_caption_in_discovery(tmp_path):
    _clip(tmp_path / "a", "talk", "A woman speaks.")
    _clip(tmp_path / "a", "blank", "")
    _clip(tmp_path / "a", "nocap", None)
    spec = DatasetSpec(tmp_path / "a", caption_prefix="sks", caption_separator=" | ", default_caption="someone talks")
    clips = {c.stem: c for c in discover([spec]).clips}
    assert clips["talk"].caption == "sks | A woman speaks."
    assert clips["blank"].caption == "sks"  # no separator trailing the trigger word
    assert clips["nocap"].caption == "sks | someone talks"
    assert [(p.code, p.blocking) for p in clips["nocap"].problems] == [("caption-default", False)]
    # Without a default the missing caption still blocks, and without a prefix the text is untouched.
    plain = {c.stem: c for c in discover([DatasetSpec(tmp_path / "a")]).clips}
    assert plain["talk"].caption == "A woman speaks."
    assert [p.code for p in plain["nocap"].problems] == ["caption-missing"]


def test_check_shows_the_final_caption(tmp_path, capsys):
    _clip(tmp_path / "a", "nocap", None)
    args = [str(tmp_path / "a"), "--min-side", "40", "--bucket", "64x48@8", "--caption-prefix", "sks", "--default-caption", "hi"]
    assert check_cmd.main([*args, "--json"]) == check_cmd.EXIT_OK  # a warning, not a block
    doc = json.loads(capsys.readouterr().out)
    assert doc["clips"][0]["caption"] == "sks, hi"
    assert [p["code"] for p in doc["clips"][0]["problems"]] == ["caption-default"]
    check_cmd.main(args)
    assert 'caption "sks, hi"' in capsys.readouterr().out


def test_prefix_with_edge_spaces_is_refused():
    config = Config()
    config.data.datasets = [DatasetEntry(path="x", caption_prefix="sks ")]
    assert any(p.key == "data.datasets[0].caption_prefix" for p in check_config(config))


def test_changed_prefix_re_encodes_only_that_datasets_texts(tmp_path, tiny_model_dir):
    _clip(tmp_path / "a", "a0", "First speaker.", seed=0)
    _clip(tmp_path / "b", "b0", "Second speaker.", seed=1)
    config = Config()
    config.model.source = str(tiny_model_dir)
    config.data.datasets = [DatasetEntry(path=str(tmp_path / "a")), DatasetEntry(path=str(tmp_path / "b"))]
    config.data.resolution = (64, 48)
    config.data.cache_dir = str(tmp_path / "cache")
    for key, value in SMALL.items():
        setattr(config.data, key, value)
    before = {r.clip_id: r.text_key for r in fill_cache(config, device="cpu").records}
    config.data.datasets[0].caption_prefix = "sks"
    work, _, _ = plan_cache(config)
    after = {r.clip_id: r.text_key for r in work.plan.records}
    assert after["b/b0.mp4"] == before["b/b0.mp4"]
    assert after["a/a0.mp4"] != before["a/a0.mp4"]
    # Exactly the prefixed caption is missing from the cache; no latent or audio entry is.
    assert [(t.key, t.caption) for t in work.texts] == [(after["a/a0.mp4"], "sks, First speaker.")]
    assert not (work.windows or work.references or work.audio)
