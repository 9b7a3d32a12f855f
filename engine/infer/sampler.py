"""The official S2V sampling loop on prepared conditions: chunks, CFG, solver, VAE decode, motion chaining.

Per chunk r of 80 new frames (spec/S2V_MODEL.md §4.1, §8):
- noise [1, 16, 20, H/8, W/8] from a generator seeded `seed + r`;
- the conditional pass gets the prompt, the chunk's audio, the reference latent, no pose (zeros) and the motion
  latents; the unconditional pass the negative prompt and the audio times 0, everything else the same;
- chunk 0 drops the motion frames (there is no history yet);
- decode: chunk 0 decodes [reference latent | 20 latents], keeps the last 80 frames, then drops the first 3
  (77 frames); later chunks decode [19 motion latents | 20 latents] and keep the last 80;
- the newest 73 pixel frames (a sliding buffer that starts as 73 mid-grey frames) are re-encoded as the next
  chunk's 19 motion latents.
A video of n chunks therefore has 80 n - 3 frames at 16 fps.

Noise is drawn in fp32 on the CPU generator, so a seed gives the same sample on any device (the official code
draws bf16 noise on the GPU generator, which no other device can reproduce).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from engine.infer.audio import CHUNK_FRAMES, DrivingAudio
from engine.infer.schedule import DEFAULT_CFG, DEFAULT_SHIFT, DEFAULT_STEPS, guided, make_solver
from engine.models.components import decode_latents, encode_video

MOTION_FRAMES = 73
MOTION_LATENTS = (MOTION_FRAMES + 3) // 4  # 19
FIRST_CHUNK_DROPPED_FRAMES = 3  # the reference latent decodes to 1 frame + 3 frames of its 4-frame group
LATENT_CHANNELS = 16


class SamplingStopped(Exception):
    """The stop event was set between two sampling steps."""


@dataclass(frozen=True)
class SampleOptions:
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG
    solver: str = "unipc"
    shift: float = DEFAULT_SHIFT
    sigma_schedule: str = "shifted"  # the official shifted sigmas, or "beta" (engine.infer.schedule)
    seed: int = 0
    lora_scale: float = 1.0  # multiplies each LoRA layer's alpha / rank for this render (1 = as trained)


@dataclass
class Conditioning:
    """Everything a sample depends on besides the weights and options; tensors on any device."""

    text: torch.Tensor  # [1, 512, D] UMT5 states of the prompt, trimmed and zero-padded
    text_negative: torch.Tensor  # [1, 512, D] the negative prompt's
    ref_latents: torch.Tensor  # [1, 16, 1, H/8, W/8]
    audio: DrivingAudio
    height: int
    width: int

    @property
    def chunks(self) -> int:
        return self.audio.chunks

    def frame_count(self) -> int:
        return CHUNK_FRAMES * self.chunks - FIRST_CHUNK_DROPPED_FRAMES


def chunk_latent_frames(chunk_frames: int = CHUNK_FRAMES, motion_frames: int = MOTION_FRAMES) -> int:
    return (chunk_frames + 3 + motion_frames) // 4 - (motion_frames + 3) // 4


def chunk_noise(seed: int, r: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + r)
    return torch.randn(latent_shape, generator=gen, dtype=torch.float32)


class Denoiser:
    """One chunk's guided velocity, v(x, t), with the model in inference mode."""

    def __init__(self, model, device: torch.device, autocast_dtype: torch.dtype | None) -> None:
        self.model = model
        self.device = device
        self.autocast_dtype = autocast_dtype

    def _amp(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def velocity(self, x, timestep, text, ref, audio, motion, drop_motion):
        with self._amp():
            return self.model(x, timestep, text, ref, audio, motion_latents=motion, pose_latents=None,
                              motion_frames=(MOTION_FRAMES, MOTION_LATENTS), drop_motion_frames=drop_motion).float()

    def guided_velocity(self, x, timestep, cond: Conditioning, audio, motion, drop_motion, cfg_scale):
        dev = self.device
        ref = cond.ref_latents.to(dev)
        v_cond = self.velocity(x, timestep, cond.text.to(dev), ref, audio, motion, drop_motion)
        v_uncond = None
        if cfg_scale > 1:  # the official loop skips the unconditional pass at scale <= 1
            v_uncond = self.velocity(x, timestep, cond.text_negative.to(dev), ref, audio * 0.0, motion,
                                     drop_motion)
        return guided(v_cond, v_uncond, cfg_scale)


def denoise_chunk(denoiser: Denoiser, cond: Conditioning, noise: torch.Tensor, audio: torch.Tensor,
                  motion: torch.Tensor | None, drop_motion: bool, options: SampleOptions,
                  on_step: Callable[[], None] | None = None, stop: threading.Event | None = None) -> torch.Tensor:
    solver = make_solver(options.solver, options.steps, options.shift, options.sigma_schedule)
    x = noise.to(denoiser.device)
    for t in solver.timesteps:
        if stop is not None and stop.is_set():
            raise SamplingStopped()
        timestep = t.reshape(1).to(denoiser.device)
        v = denoiser.guided_velocity(x, timestep, cond, audio, motion, drop_motion, options.cfg_scale)
        x = solver.step(v, x)
        if on_step is not None:
            on_step()
    return x


@torch.no_grad()
def sample_frames(model, vae, cond: Conditioning, options: SampleOptions, device: torch.device,
                  autocast_dtype: torch.dtype | None = None, progress: Callable[[int, int], None] | None = None,
                  stop: threading.Event | None = None) -> torch.Tensor:
    """Render every chunk of `cond`; returns uint8 frames [F, H, W, 3] on the CPU (F = 80 chunks - 3).

    The model is put in eval mode for the call and restored after (validation runs inside training).
    """
    was_training = model.training
    model.eval()
    try:
        with lora_scaled(model, options.lora_scale):
            return _sample_frames(model, vae, cond, options, device, autocast_dtype, progress, stop)
    finally:
        model.train(was_training)


@contextmanager
def lora_scaled(model, scale: float):
    """Every peft adapter layer of `model` (LoRA, LoHa, LoKr: each scales its update by `scaling`) at `scale`
    times its trained strength for the block, restored after.

    The saved scalings are put back as they were (not divided back), so the model trains on bit-for-bit
    unchanged after a validation at another strength. A model without adapter layers ignores the scale. A DoRA
    is refused: scaling its update inside the row norm is not a strength (at 0 it is not the base model)."""
    if scale == 1.0:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    saved = []
    for module in model.modules():
        if any(getattr(module, "use_dora", {}).values()):
            raise ValueError(f"a LoRA strength of {scale:g} cannot be applied to a DoRA (its magnitudes are "
                             "absolute): sample it at strength 1")
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and isinstance(module, BaseTunerLayer):
            saved.append((module, dict(scaling)))
            for name in scaling:
                scaling[name] = scaling[name] * scale
    try:
        yield
    finally:
        for module, values in saved:
            module.scaling.clear()
            module.scaling.update(values)


def _sample_frames(model, vae, cond, options, device, autocast_dtype, progress, stop):
    denoiser = Denoiser(model, device, autocast_dtype)
    lat_t = chunk_latent_frames()
    shape = (1, LATENT_CHANNELS, lat_t, cond.height // 8, cond.width // 8)
    total = options.steps * cond.chunks
    done = [0]

    def on_step() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    # The sliding buffer of the newest 73 pixel frames, in [-1, 1]; zeros (mid-grey) before the first chunk.
    last_frames = torch.zeros(1, 3, MOTION_FRAMES, cond.height, cond.width)
    motion = None
    ref = cond.ref_latents.to(device)
    out = []
    for r in range(cond.chunks):
        first = r == 0
        audio = cond.audio.chunk(r).to(device)
        latents = denoise_chunk(denoiser, cond, chunk_noise(options.seed, r, shape), audio, motion, first,
                                options, on_step, stop)
        head = ref if first else motion
        video = decode_latents(vae, torch.cat([head.to(latents.dtype), latents], dim=2)).float().cpu()
        video = video[:, :, -CHUNK_FRAMES:]
        if first:
            video = video[:, :, FIRST_CHUNK_DROPPED_FRAMES:]
        out.append(video)
        if r + 1 < cond.chunks:  # the last chunk's motion latents would never be used
            keep = min(MOTION_FRAMES, video.shape[2])
            last_frames = torch.cat([last_frames[:, :, keep:], video[:, :, -keep:]], dim=2)
            motion = encode_video(vae, last_frames).to(device, torch.float32)
    frames = torch.cat(out, dim=2)[0]  # [3, F, H, W] in [-1, 1]
    return ((frames.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
