"""Media decode: frames by timestamp at 16 fps, audio at 16 kHz mono aligned to the frame window."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data import media, scan, synth
from engine.data.windows import Window, audio_features_per_frame, crop_for, Bucket


def _indices(frames: np.ndarray) -> list[int]:
    return [synth.read_frame_index(f) for f in frames]


@pytest.mark.parametrize("fps", [60, 30, 25, 12])
def test_frames_picked_by_timestamp(tmp_path, fps):
    clip = synth.make_talking_clip(tmp_path, f"src{fps}", fps=fps, duration_s=6.0, stamp_index=True,
                                   audio="none", use_espeak=False)
    timing = scan.read_stream_timing(clip.video)
    assert timing.mean_fps == pytest.approx(fps, rel=1e-3)
    assert not timing.is_variable_rate()
    n16 = media.frames_at_rate(timing.video_duration_s, 16)
    assert n16 == 96  # 6 s at 16 fps
    times = np.arange(n16) / 16
    got = _indices(media.decode_frames(clip.video, times))
    # Frame k shows the source frame on screen at k/16: floor(k * fps / 16), computed exactly in integers.
    assert got == [k * fps // 16 for k in range(n16)]


def test_frames_from_a_later_window_after_seek(tmp_path):
    clip = synth.make_talking_clip(tmp_path, "long", fps=30, duration_s=8.0, stamp_index=True, audio="none",
                                   use_espeak=False)
    w = Window(start=40, frames=80, motion_frames=0)
    got = _indices(media.decode_frames(clip.video, w.frame_times_s()))
    assert got == [k * 30 // 16 for k in range(40, 120)]


def test_variable_rate_source_by_timestamp(tmp_path):
    rng = np.random.default_rng(1)
    times = np.concatenate([[0.0], np.cumsum(rng.choice([0.02, 0.045, 0.07], size=200))])
    times = times[times < 5.6]
    clip = synth.make_talking_clip(tmp_path, "vfr", container="mkv", audio="pcm", frame_times_s=times,
                                   duration_s=5.6, stamp_index=True, use_espeak=False)
    timing = scan.read_stream_timing(clip.video)
    assert timing.is_variable_rate()
    np.testing.assert_allclose(timing.video_times, np.round(times, 3), atol=1e-9)
    targets = np.arange(80) / 16
    got = _indices(media.decode_frames(clip.video, targets))
    expected = [int(np.searchsorted(np.round(times, 3), t + 1e-9, side="right") - 1) for t in targets]
    assert got == expected


def test_resize_and_crop_to_bucket(tmp_path):
    clip = synth.make_talking_clip(tmp_path, "wide", size=(128, 48), audio="none", use_espeak=False)
    crop = crop_for(128, 48, Bucket(64, 32))
    frames = media.decode_frames(clip.video, [0.0, 0.5], crop)
    assert frames.shape == (2, 32, 64, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize("source_rate", [16000, 48000])
def test_click_lands_at_its_frame(tmp_path, source_rate):
    """A click at the time of 16-fps frame 100 is at sample (100 - first frame) * 1000 of the window's
    audio, and in that frame's column after the official wav2vec2 -> video-frame mapping."""
    click_frame = 100
    clip = synth.make_talking_clip(tmp_path, "click", audio="pcm", fps=25, duration_s=11.0,
                                   audio_rate=source_rate, click_at_s=click_frame / 16, use_espeak=False)
    w = Window(start=81, frames=80, motion_frames=73)  # audio span: frames 8 .. 160
    a0, a1 = w.audio_span_s()
    audio = media.decode_audio(clip.video, a0, a1 - a0)
    assert audio.samples.shape == (w.audio_frames * 1000,)
    assert audio.missing_before == audio.missing_after == 0
    rel = click_frame - w.audio_first_frame
    assert abs(int(np.argmax(np.abs(audio.samples))) - rel * 1000) <= 1

    # Stand-in for wav2vec2: one energy value per 20 ms step (its hop is 320 samples at 16 kHz).
    x = audio.samples.astype(np.float64)
    steps = (len(x) - 400) // 320 + 1
    energy = np.array([np.sum(x[320 * j:320 * j + 400] ** 2) for j in range(steps)])
    hidden = torch.tensor(energy, dtype=torch.float32).reshape(1, steps, 1).repeat(2, 1, 3)
    per_frame = audio_features_per_frame(hidden, 0, w.audio_frames)
    assert per_frame.shape == (2, 3, w.audio_frames)
    assert int(per_frame[0, 0].argmax()) == rel


def test_audio_window_pads_outside_the_track_and_reports_it(tmp_path):
    clip = synth.make_talking_clip(tmp_path, "short", audio="pcm", duration_s=6.0, audio_duration_s=4.0,
                                   click_at_s=1.0, use_espeak=False)
    a = media.decode_audio(clip.video, 3.0, 2.0)
    assert a.samples.shape == (32000,)
    assert a.missing_after == 16000 and a.missing_before == 0
    assert not a.samples[16000:].any()


def test_separate_wav_and_stereo_48k_downmix(tmp_path):
    clip = synth.make_talking_clip(tmp_path, "sep", audio="wav", audio_rate=48000, click_at_s=2.5,
                                   use_espeak=False)
    info = media.probe(clip.audio)
    assert info.video is None and info.audio.sample_rate == 48000
    a = media.decode_audio(clip.audio, 2.0, 1.0)
    assert abs(int(np.argmax(a.samples)) - 8000) <= 1


def test_probe_reads_headers(tmp_path):
    clip = synth.make_talking_clip(tmp_path, "p", fps=30, size=(96, 64), use_espeak=False)
    info = media.probe(clip.video)
    assert (info.video.codec, info.video.width, info.video.height) == ("h264", 96, 64)
    assert info.video.rate == pytest.approx(30)
    assert info.audio.codec == "aac" and info.audio.sample_rate == 16000


def test_mpeg4_video_decodes(tmp_path):
    clip = synth.make_talking_clip(tmp_path, "m4", codec="mpeg4", stamp_index=True, audio="none",
                                   use_espeak=False)
    got = _indices(media.decode_frames(clip.video, np.arange(10) / 16))
    assert got == [k * 25 // 16 for k in range(10)]


@pytest.mark.parametrize("ext,codec,acodec,rate", [("avi", "mpeg4", "pcm_s16le", 16000),
                                                   ("mov", "h264", "pcm_s16le", 16000),
                                                   ("webm", "libvpx-vp9", "libopus", 48000),
                                                   ("m4v", "h264", "aac", 16000)])
def test_other_containers(tmp_path, ext, codec, acodec, rate):
    frames = synth.render_faces(np.zeros(40), 64, 48, stamp_index=True)
    path = synth.write_video(tmp_path / f"c.{ext}", frames, 25, codec=codec, audio_codec=acodec, audio_rate=rate,
                             audio=synth.speech_like_audio(1.6, rate))
    found = scan.scan_media(path)
    assert found.timing.mean_fps == pytest.approx(25) and found.timing.video_duration_s == pytest.approx(1.6)
    assert found.audio_end_s == pytest.approx(1.6, abs=0.01) and found.levels_db.size > 50
    assert _indices(media.decode_frames(path, np.arange(20) / 16)) == [k * 25 // 16 for k in range(20)]
