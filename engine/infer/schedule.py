"""Sampling schedule, solvers and guidance of the official S2V inference (spec/S2V_MODEL.md §8).

The official sampler builds its flow-matching sigmas as `linspace(sigma_max, 0, steps + 1)[:-1]` with
sigma_max = 0.999 (the last training sigma of a 1000-step table), shifts them with k (3 for S2V at 480p),
appends a final 0, and calls the model with the timestep `int(sigma * 1000)` (an int64 truncation, not a
rounding). Both solvers here walk exactly those sigmas and pass exactly those timesteps:

    unipc  diffusers' UniPCMultistepScheduler in flow-prediction mode (order 2, bh2, x0-predicting corrector,
           lower order at the end), given our unshifted sigmas so that its own shift reproduces the official
           sequence; it is a copy-then-port of the same diffusers code the official solver came from.
    euler  the first-order flow ODE step x <- x + (sigma_next - sigma) * v.

CFG follows the official rule: with scale > 1, v = v_uncond + scale * (v_cond - v_uncond); with scale <= 1 the
unconditional pass is skipped and v = v_cond (so scale 1 is exactly the conditional prediction).
"""
from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 3.0
DEFAULT_STEPS = 40
DEFAULT_CFG = 4.5
SOLVERS = ("unipc", "euler")


def shift_sigma(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def base_sigmas(steps: int) -> np.ndarray:
    """Unshifted sigmas of `steps` model calls, from 0.999 down (float64, as numpy computes them officially)."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))  # the official table is fp32
    return np.linspace(sigma_max, 0.0, steps + 1)[:-1]


def flow_sigmas(steps: int, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """[steps + 1] fp32 shifted sigmas ending in 0."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = shift_sigma(base_sigmas(steps), shift)
    return torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))


def flow_timesteps(steps: int, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """[steps] int64 model timesteps: sigma * 1000 truncated, as the official scheduler casts them."""
    s = shift_sigma(base_sigmas(steps), shift)
    return torch.from_numpy(s * NUM_TRAIN_TIMESTEPS).to(torch.int64)


class EulerFlowSolver:
    def __init__(self, steps: int, shift: float = DEFAULT_SHIFT) -> None:
        self.sigmas = flow_sigmas(steps, shift)
        self.timesteps = flow_timesteps(steps, shift)
        self._i = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        s, s_next = float(self.sigmas[self._i]), float(self.sigmas[self._i + 1])
        self._i += 1
        # The step in fp32 whatever the model's dtype, so 40 small updates do not round away.
        return (sample.float() + (s_next - s) * velocity.float()).to(sample.dtype)


class UniPCFlowSolver:
    def __init__(self, steps: int, shift: float = DEFAULT_SHIFT) -> None:
        from diffusers import UniPCMultistepScheduler

        self._sched = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, solver_order=2, prediction_type="flow_prediction",
            predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
            use_flow_sigmas=True, flow_shift=shift, timestep_spacing="linspace",
        )
        self._sched.set_timesteps(sigmas=base_sigmas(steps))
        self._sched.set_begin_index(0)  # walk the table by position, never by timestep lookup
        self.sigmas = self._sched.sigmas
        self.timesteps = self._sched.timesteps
        expected = flow_timesteps(steps, shift)
        if not torch.equal(self.timesteps.cpu(), expected):  # a diffusers change would silently alter samples
            raise RuntimeError("diffusers' UniPCMultistepScheduler no longer reproduces the official S2V "
                               "timesteps; pin diffusers to the version in pyproject.toml")
        self._i = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        out = self._sched.step(velocity.float(), self.timesteps[self._i], sample.float(), return_dict=False)[0]
        self._i += 1
        return out.to(sample.dtype)


def make_solver(name: str, steps: int, shift: float = DEFAULT_SHIFT):
    if name == "unipc":
        return UniPCFlowSolver(steps, shift)
    if name == "euler":
        return EulerFlowSolver(steps, shift)
    raise ValueError(f"solver {name!r} is not one of {', '.join(SOLVERS)}")


def guided(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance as the official loop combines the two predictions."""
    if uncond is None or scale <= 1:
        return cond
    return uncond + scale * (cond - uncond)
