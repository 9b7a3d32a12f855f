"""Inference on the tiny model (CPU): schedule, solvers, CFG, reference size rule, mp4 output, chained chunks."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from engine.infer.audio import CHUNK_FRAMES, chunk_count
from engine.infer.reference import fit_reference, generation_size
from engine.infer.sampler import Conditioning, Denoiser, SampleOptions, sample_frames
from engine.infer.schedule import (UniPCFlowSolver, flow_sigmas, flow_timesteps, guided,
                                   make_solver)




@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Files of a reference picture and ~2 s and ~5.2 s of speech-like audio."""
    from PIL import Image

    from engine.data.synth import speech_audio, write_audio_file

    d = tmp_path_factory.mktemp("inputs")
    img = (np.random.RandomState(0).rand(90, 160, 3) * 255).astype(np.uint8)
    Image.fromarray(img).save(d / "face.png")
    write_audio_file(d / "short.wav", speech_audio(2.0), 16000)
    write_audio_file(d / "long.wav", speech_audio(5.2, seed=1), 16000)
    return d


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from engine.infer import S2VPipeline

    return S2VPipeline.load(tiny_model_dir, "cpu", "fp32")


# ---- schedule and solvers -------------------------------------------------------------------------------------
def test_sigmas_and_timesteps_are_the_official_ones():
    s = flow_sigmas(40, 3.0)
    base = np.linspace(np.float32(0.999), 0.0, 41)[:-1]
    np.testing.assert_allclose(s[:-1].numpy(), 3 * base / (1 + 2 * base), rtol=1e-6)
    assert s[-1] == 0 and len(s) == 41
    t = flow_timesteps(40, 3.0)
    assert t.dtype == torch.int64 and t[0] == 999 and t[-1] == int(3 * base[-1] / (1 + 2 * base[-1]) * 1000)
    unipc = UniPCFlowSolver(40, 3.0)  # diffusers' scheduler, fed so that it walks the same table
    assert torch.equal(unipc.timesteps, t)
    torch.testing.assert_close(unipc.sigmas, s)


@pytest.mark.parametrize("steps", [4, 12, 40])
def test_unipc_and_euler_agree_when_the_velocity_is_exact(steps):
    """A stub whose velocity points exactly at a fixed x0 (v = (x - x0) / sigma): both solvers must land on x0."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 2, 4, 4, generator=gen)
    noise = torch.randn(1, 16, 2, 4, 4, generator=gen)
    results = {}
    for name in ("unipc", "euler"):
        solver = make_solver(name, steps, 3.0)
        x = noise.clone()
        for i in range(steps):
            sigma = float(solver.sigmas[i])
            x = solver.step((x - x0) / sigma, x)
        results[name] = x
    torch.testing.assert_close(results["unipc"], x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["euler"], results["unipc"], atol=1e-4, rtol=1e-4)


def test_guidance_formula_and_scale_one():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert guided(c, u, 4.5).item() == pytest.approx(1.0 + 4.5 * 1.0)
    assert guided(c, u, 1.0) is c and guided(c, None, 4.5) is c


class Spy(torch.nn.Module):
    """Records the conditioning of every call; the velocity depends on text and audio so CFG is visible."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, text, ref, audio, motion_latents=None, pose_latents=None, motion_frames=None,
                drop_motion_frames=False):
        self.calls.append(dict(text=text.clone(), audio=audio.clone(), ref=ref, motion=motion_latents,
                               pose=pose_latents, frames=motion_frames, drop=drop_motion_frames, t=t.clone()))
        return x * 0 + text.mean() + audio.mean()


def _cond(audio_chunks=1):
    from engine.infer.audio import DrivingAudio

    feats = torch.randn(3, 32, CHUNK_FRAMES * audio_chunks) + 1.0
    return Conditioning(text=torch.ones(1, 512, 32), text_negative=-torch.ones(1, 512, 32),
                        ref_latents=torch.randn(1, 16, 1, 8, 8),
                        audio=DrivingAudio(np.zeros(16000, np.float32), feats, audio_chunks), height=64, width=64)


def test_cfg_scale_one_is_the_conditional_prediction_and_the_negative_pass_zeroes_the_audio(pipe):
    cond = _cond()
    spy = Spy()
    d = Denoiser(spy, torch.device("cpu"), None)
    x, t, audio = torch.randn(1, 16, 20, 8, 8), torch.tensor([999]), cond.audio.chunk(0)
    out = d.guided_velocity(x, t, cond, audio, None, True, 1.0)
    assert len(spy.calls) == 1 and torch.equal(out, d.velocity(x, t, cond.text, cond.ref_latents, audio, None, True))
    spy.calls.clear()
    d.guided_velocity(x, t, cond, audio, None, True, 4.5)
    c, u = spy.calls
    assert torch.equal(c["text"], cond.text) and torch.equal(u["text"], cond.text_negative)
    assert torch.equal(c["audio"], audio) and not u["audio"].any()
    assert c["ref"] is u["ref"] and c["pose"] is None and u["pose"] is None and c["frames"] == (73, 19)
    # The same with the real tiny transformer: scale 1 gives exactly the conditional velocity.
    real = Denoiser(pipe.model, torch.device("cpu"), None)
    audio = torch.randn(1, 3, 32, 80)
    cond = Conditioning(torch.randn(1, 512, 32), torch.randn(1, 512, 32), torch.randn(1, 16, 1, 8, 8),
                        cond.audio, 64, 64)
    with torch.no_grad():
        v1 = real.guided_velocity(x, t, cond, audio, None, True, 1.0)
        vc = real.velocity(x, t, cond.text, cond.ref_latents, audio, None, True)
        v45 = real.guided_velocity(x, t, cond, audio, None, True, 4.5)
    assert torch.equal(v1, vc) and not torch.allclose(v45, vc)


def test_chunks_chain_through_motion_frames():
    """Chunk 0 drops the motion; chunk 1 gets 19 motion latents of the first chunk's last 73 frames."""
    class FakeVae:
        """Decodes each latent frame to 4 frames (1 for the first), encodes 4k+1 frames to k+1 latents."""

        def __init__(self):
            self.encoded = []

        def parameters(self):
            yield torch.zeros(1)

        class config:  # noqa: N801 - mimics the diffusers config attribute
            latents_mean = [0.0] * 16
            latents_std = [1.0] * 16

        def decode(self, z):
            frames = torch.cat([z[:, :3, :1], z[:, :3, 1:].repeat_interleave(4, dim=2)], dim=2)
            frames = frames.repeat_interleave(8, 3).repeat_interleave(8, 4).tanh()
            return type("D", (), {"sample": frames})

        def encode(self, x):
            self.encoded.append(x.shape)
            lat = x[:, :1, ::4, ::8, ::8].repeat(1, 16, 1, 1, 1)
            return type("E", (), {"latent_dist": type("P", (), {"mode": lambda self: lat})()})

    spy, vae, cond = Spy(), FakeVae(), _cond(2)
    frames = sample_frames(spy, vae, cond, SampleOptions(steps=2, cfg_scale=1.0), torch.device("cpu"))
    assert frames.shape == (2 * CHUNK_FRAMES - 3, 64, 64, 3) and frames.dtype == torch.uint8
    first, second = spy.calls[0], spy.calls[2]
    assert first["drop"] and first["motion"] is None
    assert not second["drop"] and tuple(second["motion"].shape) == (1, 16, 19, 8, 8)
    assert vae.encoded == [(1, 3, 73, 64, 64)]  # the last chunk's motion is never encoded
    assert torch.equal(first["audio"], cond.audio.chunk(0)) and torch.equal(second["audio"], cond.audio.chunk(1))


# ---- reference size rule -------------------------------------------------------------------------------------
def test_generation_size_follows_the_official_rule():
    assert generation_size(1080, 1920, 832 * 480) == (448, 832)  # 16:9 -> 448x832, not 480x832
    assert generation_size(480, 832, 832 * 480) == (448, 832)  # 480 would pad to 512: over the area
    h, w = generation_size(100, 150, 832 * 480)  # small images are only padded
    assert (h, w) == (128, 192)
    for hh, ww in [(720, 1280), (1280, 720), (1000, 1000), (300, 2000)]:
        gh, gw = generation_size(hh, ww, 832 * 480)
        assert gh % 64 == 0 and gw % 64 == 0 and gh * gw <= 832 * 480


def test_fit_reference_resizes_the_short_side_and_pads_black():
    img = np.full((90, 160, 3), 200, np.uint8)
    out = fit_reference(img, 128, 192)  # short side 90 -> 128, long 160 -> 227, cropped to 192
    assert out.shape == (128, 192, 3) and out.min() == 200
    tall = fit_reference(np.full((100, 100, 3), 200, np.uint8), 64, 128)  # 64x64 padded to 128 wide
    assert tall.shape == (64, 128, 3)
    assert (tall[:, :32] == 0).all() and (tall[:, 96:] == 0).all() and (tall[:, 32:96] == 200).all()


# ---- end to end ----------------------------------------------------------------------------------------------
def _video_stats(path):
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        rate = vs.average_rate
        n = sum(1 for _ in c.decode(vs))
    from engine.data.media import decode_audio

    samples = decode_audio(path).samples
    return n, float(rate), len(samples) / 16000


def _sample_command(model_dir, speech, out, audio: str, *extra: str) -> int:
    from s2v_tui.commands.sample import main

    return main(["--model", str(model_dir), "--image", str(speech / "face.png"), "--audio", str(speech / audio),
                 "--prompt", "a man talks", "--out", str(out), "--device", "cpu", *extra])


def test_sample_command_renders_an_mp4_with_frames_fps_and_audio(tiny_model_dir, speech, tmp_path, capsys):
    out = tmp_path / "talk.mp4"
    rc = _sample_command(tiny_model_dir, speech, out, "short.wav", "--steps", "3", "--size", "128x128", "--seed", "7")
    assert rc == 0, capsys.readouterr().err
    frames, fps, audio_s = _video_stats(out)
    # One chunk is rendered (77 frames); the file ends with the 2.0 s of speech: 32 frames at 16 fps.
    assert frames == 32 < CHUNK_FRAMES - 3 and fps == 16.0
    assert audio_s == pytest.approx(2.0, abs=0.07)  # one aac frame of tolerance
    assert "trimming the last chunk to the audio: 32 of 77 frames" in capsys.readouterr().err


def test_sample_command_cuts_the_audio_to_the_chunks_it_rendered(tiny_model_dir, speech, tmp_path, capsys):
    out = tmp_path / "first-chunk.mp4"
    rc = _sample_command(tiny_model_dir, speech, out, "long.wav", "--steps", "2", "--size", "64x64",
                         "--max-chunks", "1")
    assert rc == 0, capsys.readouterr().err
    frames, fps, audio_s = _video_stats(out)
    assert frames == CHUNK_FRAMES - 3 and fps == 16.0  # one chunk of the 5.2 s of speech
    assert audio_s == pytest.approx((CHUNK_FRAMES - 3) / 16, abs=0.07)


def test_chained_two_chunk_sample(pipe, speech):
    cond = pipe.prepare(speech / "face.png", speech / "long.wav", "a man talks", max_area=64 * 64)
    assert cond.chunks == 2 == chunk_count(254)
    frames = pipe.render(cond, SampleOptions(steps=2, solver="euler", seed=3))
    assert frames.shape == (2 * CHUNK_FRAMES - 3, 64, 64, 3)


def test_stop_event_interrupts_sampling(pipe):
    import threading

    from engine.infer import SamplingStopped

    stop = threading.Event()
    stop.set()
    pipe.model.train()  # as during training: sampling switches to eval and must switch back, even when stopped
    try:
        with pytest.raises(SamplingStopped):
            pipe.render(_cond(), SampleOptions(steps=2), stop=stop)
        assert pipe.model.training
    finally:
        pipe.model.eval()
