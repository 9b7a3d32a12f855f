"""Discovery and pairing: captions, metadata files, separate audio, several datasets, links."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data import synth
from engine.data.discover import (DatasetSpec, decode_caption_bytes, discover, epoch_length,
                                  sampling_probabilities)

FAST = {"size": (64, 48), "duration_s": 5.5, "use_espeak": False}


def _codes(found) -> list[str]:
    return [p.code for p in found.problems] + [p.code for c in found.clips for p in c.problems]


def test_txt_captions_and_embedded_audio(tmp_path):
    synth.make_talking_clip(tmp_path, "a", caption="first", **FAST)
    synth.make_talking_clip(tmp_path / "sub", "b", caption="second", audio="pcm", **FAST)
    (tmp_path / "sub" / "B2.MP4").write_bytes((tmp_path / "a.mp4").read_bytes())  # upper-case extension
    (tmp_path / "sub" / "B2.txt").write_text("third", encoding="utf-8")
    hidden = tmp_path / ".cache"
    synth.make_talking_clip(hidden, "skipped", **FAST)
    found = discover([tmp_path])
    assert [c.video.name for c in found.clips] == ["a.mp4", "B2.MP4", "b.mkv"]
    assert [c.caption for c in found.clips] == ["first", "third", "second"]
    assert all(c.audio is None and c.audio_path == c.video for c in found.clips)
    assert _codes(found) == []


def test_metadata_jsonl_wins_over_txt_and_names_extra_files(tmp_path):
    synth.make_talking_clip(tmp_path, "a", caption="from txt", **FAST)
    synth.make_talking_clip(tmp_path, "b", caption=None, **FAST)
    (tmp_path / "ref.png").write_bytes(b"png")
    (tmp_path / "voice.wav").write_bytes(b"wav")
    rows = [{"file_name": "a.mp4", "caption": "from metadata", "reference_image": "ref.png", "audio": "voice.wav"},
            {"file_name": "b.mp4", "text": "b from metadata"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    found = discover([tmp_path])
    a, b = found.clips
    assert a.caption == "from metadata" and a.caption_source.name == "metadata.jsonl"
    assert a.reference_image == tmp_path / "ref.png" and a.audio == tmp_path / "voice.wav"
    assert b.caption == "b from metadata"
    assert _codes(found) == []


def test_metadata_csv(tmp_path):
    synth.make_talking_clip(tmp_path, "a", caption=None, **FAST)
    with open(tmp_path / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption", "pose_video"])
        w.writerow(["a.mp4", "a, with a comma", ""])
    (clip,) = discover([tmp_path]).clips
    assert clip.caption == "a, with a comma" and clip.pose_video is None


def test_separate_audio_folder_pairs_by_stem(tmp_path):
    ds, audio = tmp_path / "ds", tmp_path / "audio"
    synth.make_talking_clip(ds, "x", audio="wav", audio_dir=audio, **FAST)
    synth.write_audio_file(audio / "y.mp3", np.zeros(16000, np.float32), 16000, codec="libmp3lame")
    synth.make_talking_clip(ds, "y", audio="none", **FAST)
    found = discover([DatasetSpec(ds, audio_dir=audio)])
    assert [(c.stem, c.audio) for c in found.clips] == [("x", audio / "x.wav"), ("y", audio / "y.mp3")]
    assert _codes(found) == []


def test_same_stem_in_different_folders_is_fine_without_audio_folder(tmp_path):
    synth.make_talking_clip(tmp_path / "one", "take", **FAST)
    synth.make_talking_clip(tmp_path / "two", "take", **FAST)
    assert _codes(discover([tmp_path])) == []
    # With a shared audio folder, "take.wav" would be ambiguous.
    (tmp_path / "audio").mkdir()
    synth.write_audio_file(tmp_path / "audio" / "take.wav", np.zeros(100, np.float32), 16000)
    assert _codes(discover([DatasetSpec(tmp_path, audio_dir=tmp_path / "audio")])) == ["duplicate-stem"] * 2


def test_several_datasets_with_repeats_and_weights(tmp_path):
    for i in range(3):
        synth.make_talking_clip(tmp_path / "big", f"c{i}", **FAST)
    synth.make_talking_clip(tmp_path / "small", "s", **FAST)
    found = discover([DatasetSpec(tmp_path / "big", weight=1.0),
                      DatasetSpec(tmp_path / "small", repeats=3, weight=1.0, name="rare")])
    assert [c.dataset for c in found.clips] == ["big"] * 3 + ["rare"]
    assert epoch_length(found.clips) == 6
    probs = sampling_probabilities(found.clips)
    assert sum(probs[:3]) == pytest.approx(0.5) and probs[3] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="repeats"):
        DatasetSpec(tmp_path, repeats=0)


def test_linked_folder_is_followed_once_and_loops_are_not(tmp_path):
    real = tmp_path / "real"
    synth.make_talking_clip(real, "r", **FAST)
    ds = tmp_path / "ds"
    ds.mkdir()
    os.symlink(real, ds / "link1")
    os.symlink(real, ds / "link2")  # the same folder twice is not a loop, but is scanned once
    os.symlink(ds, ds / "link1" / "back")  # real/back -> ds, which contains link1 -> real: a loop
    found = discover([ds])
    assert len(found.clips) == 1
    assert [p.code for p in found.problems] == ["symlink-loop"]


def test_caption_encodings():
    assert decode_caption_bytes("héllo".encode("utf-8-sig")) == "héllo"
    assert decode_caption_bytes("héllo".encode("utf-16")) == "héllo"
    assert decode_caption_bytes("héllo".encode("latin-1")) is None


def test_engine_data_imports_no_ui_and_no_torch():
    code = ("import sys, engine.data.doctor, engine.data.discover, engine.data.media, engine.data.windows, "
            "engine.data.scan, engine.data.samples, engine.data.caption_tokens, engine.data.synth, "
            "engine.data.synth_broken; "
            "heavy = ('textual', 'rich', 's2v_tui', 'torch', 'transformers'); "
            "print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "[]"
