"""The synthetic talking-clip generator: speech-like audio, a mouth that follows it, captions."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

from engine.data import media, synth
from engine.data.doctor import DoctorSettings, inspect_datasets


def test_speech_like_audio_has_voiced_bursts_and_pauses():
    a = synth.speech_like_audio(4.0, 16000, seed=2)
    assert a.dtype == np.float32 and a.shape == (64000,)
    assert 0.45 < np.max(np.abs(a)) <= 0.5
    blocks = np.sqrt(np.mean(a.reshape(-1, 320) ** 2, axis=1))
    quiet = np.mean(blocks < 1e-3)
    assert 0.05 < quiet < 0.6  # speech with pauses, not a tone and not silence


def test_mouth_follows_the_audio_envelope(tmp_path):
    clip = synth.make_talking_clip(tmp_path, "talk", fps=16, duration_s=5.0, use_espeak=False, seed=4)
    frames = media.decode_frames(clip.video, np.arange(80) / 16)
    # Mouth area = dark red pixels; its size should rise and fall with the audio loudness.
    r, g, b = (frames[..., i].astype(int) for i in range(3))
    mouth = ((r > 60) & (r < 130) & (g < 60) & (b < 70)).sum(axis=(1, 2))
    audio = media.decode_audio(clip.video, 0, 5.0).samples
    env = synth.mouth_openness(audio, 16000, np.arange(80) / 16)
    assert np.corrcoef(mouth, env)[0, 1] > 0.7
    assert clip.caption.read_text(encoding="utf-8").strip() == synth.DEFAULT_CAPTION


def test_synthetic_dataset_passes_the_doctor(tmp_path):
    synth.make_talking_dataset(tmp_path, 3, size=(64, 48), duration_s=5.5, use_espeak=False)
    report = inspect_datasets([tmp_path], DoctorSettings(min_side=40))
    assert report.all_problems == [] and all(c.usable for c in report.clips)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_speech_when_available():
    a = synth.espeak_audio("hello there", 16000)
    assert a is not None and a.size > 8000 and np.max(np.abs(a)) > 0.05


def test_rich_output_on_a_terminal(tmp_path):
    from rich.console import Console

    from s2v_tui.commands import check as check_cmd

    synth.make_talking_clip(tmp_path, "nocap", caption=None, use_espeak=False)
    report = inspect_datasets([tmp_path], DoctorSettings(min_side=40))
    buf = io.StringIO()
    check_cmd._print_rich(report, Console(file=buf, width=160, force_terminal=True, color_system=None), False)
    text = buf.getvalue()
    assert "caption-missing" in text and "nocap.mp4" in text and "1 blocking" in text
