"""Loading one training window: frames, audio and reference aligned and cropped to the bucket."""
from __future__ import annotations

import av
import numpy as np
import pytest

from engine.data import synth
from engine.data.discover import discover
from engine.data.doctor import DoctorSettings, inspect_datasets
from engine.data.problems import DataError
from engine.data.samples import load_window
from engine.data.windows import Bucket, Window, crop_for, plan_windows


def test_window_sample_is_aligned(tmp_path):
    synth.make_talking_clip(tmp_path, "c", audio="pcm", fps=30, duration_s=10.5, stamp_index=True,
                            click_at_s=120 / 16, use_espeak=False)
    (clip,) = discover([tmp_path]).clips
    windows = plan_windows(168)
    w = windows[1]
    assert (w.start, w.motion_frames) == (80, 73)
    crop = crop_for(64, 48, Bucket(32, 32))
    s = load_window(clip, w, crop, reference_frame=0)
    assert s.frames.shape == (153, 32, 32, 3) and s.reference.shape == (32, 32, 3)
    assert s.audio.shape == (153_000,) and s.audio_padded == (0, 0)
    assert s.motion.shape[0] == 73 and s.new_frames.shape[0] == 80
    # The click at frame 120 sits in frame j = 120 - 7 of the sample, i.e. audio samples [113000, 114000).
    assert int(np.argmax(s.audio)) // 1000 == 120 - w.motion_start


def test_portrait_phone_clip_is_rotated(tmp_path):
    synth.make_talking_clip(tmp_path, "phone", display_rotation=90, use_espeak=False)
    report = inspect_datasets([tmp_path], DoctorSettings(min_side=40))
    plan = report.clips[0].plan
    assert (plan.width, plan.height, plan.rotation) == (48, 64, 90)
    bucket = Bucket(48, 64)
    s = load_window(report.clips[0].clip, Window(0), crop_for(48, 64, bucket))
    assert s.frames.shape[1:] == (64, 48, 3)


def test_reference_image_from_metadata(tmp_path):
    synth.make_talking_clip(tmp_path, "c", use_espeak=False)
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100] = 255
    with av.open(str(tmp_path / "ref.png"), "w") as out:
        st = out.add_stream("png")
        st.width, st.height, st.pix_fmt = 200, 100, "rgb24"
        for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(packet)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "c.mp4", "caption": "x", "reference_image": "ref.png"}\n',
                                             encoding="utf-8")
    (clip,) = discover([tmp_path]).clips
    s = load_window(clip, Window(0), crop_for(64, 48, Bucket(32, 32)))
    assert s.reference.shape == (32, 32, 3) and s.reference_source.endswith("ref.png")
    assert s.reference[:, :8].mean() > 200 and s.reference[:, -8:].mean() < 50  # centre crop of white|black


def test_missing_audio_raises_unless_allowed(tmp_path):
    synth.make_talking_clip(tmp_path, "mute", audio="none", use_espeak=False)
    (clip,) = discover([tmp_path]).clips
    crop = crop_for(64, 48, Bucket(32, 32))
    with pytest.raises(DataError, match="no-audio-stream"):
        load_window(clip, Window(0), crop)
    s = load_window(clip, Window(0), crop, allow_silent_audio=True)
    assert not s.audio.any() and s.audio.shape == (80_000,)
