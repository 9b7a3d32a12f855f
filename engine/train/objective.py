"""The flow-matching objective, as small pure functions (spec/S2V_MODEL.md §7.2, DESIGN.md "Training semantics").

    sigma  ~ logit-normal(mean, std) or uniform(0, 1), then shifted: s' = k s / (1 + (k - 1) s)
    x_t    = (1 - s') x0 + s' eps
    target = eps - x0                  (the velocity the model predicts)
    loss   = MSE per sample over (C, T, h, w), then the mean over the batch
    timestep given to the model = s' * 1000

Every random draw takes an explicit `torch.Generator`, so a resumed run draws exactly what an uninterrupted
one would.
"""
from __future__ import annotations

import math

import torch

SIGMA_MODES = ("logit_normal", "uniform")
# train.flow_schedule_auto_shift: SimpleTuner's resolution-dependent shift, the linear mu(n) of Flux's inference
# (diffusers' FlowMatchEulerDiscreteScheduler defaults: mu 0.5 at 256 tokens, 1.15 at 4096), k = exp(mu).
AUTO_SHIFT_BASE_TOKENS, AUTO_SHIFT_MAX_TOKENS = 256, 4096
AUTO_SHIFT_BASE_MU, AUTO_SHIFT_MAX_MU = 0.5, 1.15


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """s' = k s / (1 + (k - 1) s). k > 1 moves training towards high noise, as the official inference does."""
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def auto_shift(latent_height: int, latent_width: int) -> float:
    """k = exp(mu), mu = 0.5 + 0.65 (n - 256) / 3840 with n = h w // 4, the 2x2 patches of one latent frame (the
    frame count does not enter, as in SimpleTuner): larger frames train at higher noise."""
    tokens = latent_height * latent_width // 4
    slope = (AUTO_SHIFT_MAX_MU - AUTO_SHIFT_BASE_MU) / (AUTO_SHIFT_MAX_TOKENS - AUTO_SHIFT_BASE_TOKENS)
    return math.exp(AUTO_SHIFT_BASE_MU + slope * (tokens - AUTO_SHIFT_BASE_TOKENS))


def training_shift(train, latents_shape) -> float:
    """The shift of the training sigmas of latents [.., h, w]: train.flow_shift, or the auto shift of that size."""
    if train.flow_schedule_auto_shift:
        return auto_shift(int(latents_shape[-2]), int(latents_shape[-1]))
    return train.flow_shift


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    mode: str = "logit_normal",
    shift: float = 3.0,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """[batch] shifted sigmas in (0, 1), fp32 on the generator's device."""
    device = generator.device
    if mode == "logit_normal":
        sigmas = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    elif mode == "uniform":
        sigmas = torch.rand(batch, generator=generator, device=device)
    else:
        raise ValueError(f"sigma sampling {mode!r} is not one of {', '.join(SIGMA_MODES)}")
    return shift_sigmas(sigmas, shift)


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The model's timestep input: sigma * 1000 (float)."""
    return sigmas * 1000.0


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - s) x0 + s eps, with one sigma per sample."""
    s = _expand(sigmas, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] mean squared error of each sample, computed in fp32."""
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar loss: per-sample MSE, then the mean over the batch (equal weight per sample)."""
    return per_sample_mse(prediction, target).mean()
