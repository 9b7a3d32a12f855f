"""Window and motion-frame arithmetic, reference choice, buckets, and the wav2vec2 -> frame mapping."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.data.windows import (Bucket, BucketSettings, Window, WindowSettings, aspect_buckets,
                                 audio_feature_frame_indices, audio_features_per_frame, choose_bucket,
                                 choose_reference_frame, crop_for, latent_frames, parse_fixed_bucket,
                                 plan_windows, wav2vec_steps)


def test_latent_counts_match_the_model():
    assert latent_frames(73) == 19  # motion frames -> motion latents
    assert latent_frames(81) == 21
    assert latent_frames(153) == 39  # motion + window encoded together: first 19 are the motion latents
    w = Window(start=80, frames=80, motion_frames=73)
    assert (w.latents, w.motion_latents) == (20, 19)
    # The audio encoder's causal convs turn motion + window frames into 39 steps; 19 are dropped: 20 left.
    steps = -(-(-(-w.audio_frames // 2)) // 2)
    assert steps - w.motion_latents == w.latents


def test_windows_take_motion_frames_only_when_the_clip_has_them():
    ws = plan_windows(300)
    assert [(w.start, w.motion_frames) for w in ws] == [(0, 0), (80, 73), (160, 73)]
    assert ws[1].motion_start == 7 and ws[1].end == 160
    assert (ws[1].audio_first_frame, ws[1].audio_frames) == (7, 153)
    assert ws[1].audio_span_s() == (7 / 16, 160 / 16)
    assert ws[0].audio_span_s() == (0.0, 5.0)
    # A stride shorter than the history: windows starting before frame 73 get no motion frames.
    ws = plan_windows(200, WindowSettings(stride=40))
    assert [(w.start, w.motion_frames) for w in ws] == [(0, 0), (40, 0), (80, 73), (120, 73)]


def test_too_short_clip_has_no_window_and_max_windows_spreads_them():
    assert plan_windows(79) == []
    assert [w.start for w in plan_windows(80)] == [0]
    starts = [w.start for w in plan_windows(16 * 60, WindowSettings(stride=80, max_windows=3))]
    assert starts == [0, 480, 880]


def test_window_frame_times_include_motion_frames():
    w = Window(start=100, frames=80, motion_frames=73)
    t = w.frame_times_s()
    assert len(t) == 153 and t[0] == 27 / 16 and t[-1] == 179 / 16
    assert len(w.frame_times_s(with_motion=False)) == 80


@pytest.mark.parametrize("bad", [dict(frames=81), dict(motion_frames=72), dict(stride=0), dict(max_windows=0)])
def test_window_settings_reject_bad_values(bad):
    with pytest.raises(ValueError):
        WindowSettings(**bad)


def test_reference_frame_modes():
    w = Window(start=80, frames=80, motion_frames=73)
    assert choose_reference_frame(w, 300, "first").frame == 0
    rng = random.Random(5)
    for _ in range(200):
        r = choose_reference_frame(w, 300, "outside", rng)
        assert r.mode == "outside" and not (w.motion_start <= r.frame < w.end)
        assert 0 <= choose_reference_frame(w, 300, "random", rng).frame < 300
    only = Window(start=0, frames=80)
    r = choose_reference_frame(only, 80, "outside", rng)
    assert r.mode == "random" and "no frame outside" in r.note
    with pytest.raises(ValueError):
        choose_reference_frame(w, 300, "last")


def test_aspect_buckets_respect_area_and_multiples():
    buckets = aspect_buckets(BucketSettings())
    assert Bucket(832, 480) in buckets and Bucket(480, 832) in buckets
    for b in buckets:
        assert b.width % 16 == 0 and b.height % 16 == 0
        assert b.width * b.height <= 832 * 480
        assert 0.5 <= b.aspect <= 2.0
    assert choose_bucket(1920, 1080, buckets) == Bucket(832, 480)
    assert choose_bucket(1080, 1920, buckets) == Bucket(480, 832)
    square = choose_bucket(1000, 1000, buckets)
    assert abs(square.aspect - 1) < 0.05


def test_fixed_bucket_mode():
    assert parse_fixed_bucket("832x480@80") == Bucket(832, 480, 80)
    assert aspect_buckets(BucketSettings(fixed="512x512")) == [Bucket(512, 512)]
    for bad in ("830x480", "832x480@81", "832-480"):
        with pytest.raises(ValueError):
            parse_fixed_bucket(bad)


def test_crop_covers_the_bucket():
    c = crop_for(1920, 1080, Bucket(832, 480))
    assert (c.width, c.height) == (832, 480)
    assert c.resize_w >= 832 and c.resize_h == 480 and c.left == (c.resize_w - 832) // 2 and c.top == 0
    r = crop_for(1920, 1080, Bucket(480, 480), "random", random.Random(1))
    assert 0 <= r.left <= r.resize_w - 480 and r.top == 0
    assert crop_for(400, 100, Bucket(200, 100)).kept_fraction == pytest.approx(0.5)


def test_feature_indices_follow_the_official_rounding():
    idx = audio_feature_frame_indices(0, 16, 1000)
    # round(i * 1.875) with halves to even, as np.round in the official pipeline: 7.5 -> 8, 22.5 -> 22.
    assert idx.tolist() == [0, 2, 4, 6, 8, 9, 11, 13, 15, 17, 19, 21, 22, 24, 26, 28]
    assert audio_feature_frame_indices(100, 2, 1000).tolist() == [188, 189]
    assert audio_feature_frame_indices(0, 5, 6).tolist() == [0, 2, 4, -1, -1]


def _official_mapping(hidden: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The spec's section 4.1 written out naively, one frame at a time, as a cross-check."""
    layers, t_a, ch = hidden.shape
    len30 = int(t_a / 50.0 * 30)
    feats = F.interpolate(hidden.transpose(1, 2), size=len30, mode="linear", align_corners=True).transpose(1, 2)
    times = np.linspace(0, num_frames / 16, num_frames, endpoint=False)
    cols = []
    for bi in np.round(times * 30).astype(int):
        cols.append(feats[:, bi] if bi < len30 else torch.zeros(layers, ch))
    return torch.stack(cols, dim=-1)  # [layers, ch, frames]


def test_features_per_frame_match_the_official_mapping():
    torch.manual_seed(0)
    samples = 153 * 1000
    t_a = wav2vec_steps(samples)
    assert t_a == 477
    hidden = torch.randn(25, t_a, 8)
    ours = audio_features_per_frame(hidden, 0, 153)
    assert ours.shape == (25, 8, 153)
    torch.testing.assert_close(ours, _official_mapping(hidden, 153), rtol=0, atol=0)
    # Frames past the audio get zero vectors.
    longer = audio_features_per_frame(hidden, 0, 200)
    assert torch.count_nonzero(longer[:, :, 153:]) == 0
    # An offset window equals the matching columns of the whole clip's mapping.
    torch.testing.assert_close(audio_features_per_frame(hidden, 40, 80),
                               _official_mapping(hidden, 200)[:, :, 40:120], rtol=0, atol=0)
