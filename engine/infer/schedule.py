"""Sampling schedule, solvers and guidance of the official S2V inference (spec/S2V_MODEL.md §8).

The official sampler builds its flow-matching sigmas as `linspace(sigma_max, 0, steps + 1)[:-1]` with
sigma_max = 0.999 (the last training sigma of a 1000-step table), shifts them with k (3 for S2V at 480p),
appends a final 0, and calls the model with the timestep `int(sigma * 1000)` (an int64 truncation, not a
rounding). Both solvers here walk exactly those sigmas and pass exactly those timesteps:

    unipc  diffusers' UniPCMultistepScheduler in flow-prediction mode (order 2, bh2, x0-predicting corrector,
           lower order at the end), given our unshifted sigmas so that its own shift reproduces the official
           sequence; it is a copy-then-port of the same diffusers code the official solver came from.
    euler  the first-order flow ODE step x <- x + (sigma_next - sigma) * v.

validation.sigma_schedule = "beta" (Beta Sampling is All You Need, arXiv:2407.12173, as diffusers' use_beta_sigmas
in FlowMatchEulerDiscreteScheduler) keeps the first and last of those shifted sigmas and re-spaces the steps between
them at the quantiles of a Beta(0.6, 0.6) distribution: sigma_i = s_min + F^-1(1 - i / (n - 1)) (s_max - s_min),
i = 0 .. n-1, where F^-1 is the Beta(0.6, 0.6) inverse CDF. Beta(0.6, 0.6) is U-shaped, so the steps crowd at both
ends of the trajectory (composition early, detail late) and thin out in the middle. Timesteps stay sigma * 1000
truncated; UniPC walks the same sigmas as Euler.

CFG follows the official rule: with scale > 1, v = v_uncond + scale * (v_cond - v_uncond); with scale <= 1 the
unconditional pass is skipped and v = v_cond (so scale 1 is exactly the conditional prediction).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 3.0
DEFAULT_STEPS = 40
DEFAULT_CFG = 4.5
SOLVERS = ("unipc", "euler")
SIGMA_SCHEDULES = ("shifted", "beta")
BETA_ALPHA = BETA_BETA = 0.6  # the paper's and diffusers' default


def shift_sigma(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def base_sigmas(steps: int) -> np.ndarray:
    """Unshifted sigmas of `steps` model calls, from 0.999 down (float64, as numpy computes them officially)."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))  # the official table is fp32
    return np.linspace(sigma_max, 0.0, steps + 1)[:-1]


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), on the side
    of x where the fraction converges fast (the other side by I_x(a, b) = 1 - I_(1-x)(b, a))."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _beta_cdf(1.0 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * frac


def beta_ppf(q: float, a: float = BETA_ALPHA, b: float = BETA_BETA) -> float:
    """The Beta(a, b) inverse CDF at q in [0, 1], by bisection (the CDF is monotone; 200 halvings reach float64's
    resolution everywhere, also near 0 and 1 where a < 1 makes it steep)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _beta_cdf(mid, a, b) < q else (lo, mid)
    return 0.5 * (lo + hi)


@lru_cache(maxsize=32)
def _schedule(steps: int, shift: float, schedule: str) -> tuple[float, ...]:
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = shift_sigma(base_sigmas(steps), shift)
    if schedule == "beta" and steps > 1:
        hi, lo = float(s[0]), float(s[-1])
        s = np.array([lo + beta_ppf(1.0 - i / (steps - 1)) * (hi - lo) for i in range(steps)])
    elif schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"sigma schedule {schedule!r} is not one of {', '.join(SIGMA_SCHEDULES)}")
    return tuple(float(x) for x in s)


def schedule_sigmas(steps: int, shift: float = DEFAULT_SHIFT, schedule: str = "shifted") -> np.ndarray:
    """[steps] float64 sigmas of the model calls (no final 0): the official shifted ones, or re-spaced by "beta"."""
    return np.array(_schedule(steps, float(shift), schedule))


def flow_sigmas(steps: int, shift: float = DEFAULT_SHIFT, schedule: str = "shifted") -> torch.Tensor:
    """[steps + 1] fp32 sigmas ending in 0."""
    s = schedule_sigmas(steps, shift, schedule)
    return torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))


def flow_timesteps(steps: int, shift: float = DEFAULT_SHIFT, schedule: str = "shifted") -> torch.Tensor:
    """[steps] int64 model timesteps: sigma * 1000 truncated, as the official scheduler casts them."""
    return torch.from_numpy(schedule_sigmas(steps, shift, schedule) * NUM_TRAIN_TIMESTEPS).to(torch.int64)


class EulerFlowSolver:
    def __init__(self, steps: int, shift: float = DEFAULT_SHIFT, schedule: str = "shifted") -> None:
        self.sigmas = flow_sigmas(steps, shift, schedule)
        self.timesteps = flow_timesteps(steps, shift, schedule)
        self._i = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        s, s_next = float(self.sigmas[self._i]), float(self.sigmas[self._i + 1])
        self._i += 1
        # The step in fp32 whatever the model's dtype, so 40 small updates do not round away.
        return (sample.float() + (s_next - s) * velocity.float()).to(sample.dtype)


class UniPCFlowSolver:
    def __init__(self, steps: int, shift: float = DEFAULT_SHIFT, schedule: str = "shifted") -> None:
        from diffusers import UniPCMultistepScheduler

        # The official schedule: unshifted sigmas that the scheduler's own shift turns into the official sequence.
        # Another schedule: its final sigmas, with the scheduler's shift at 1 (k s / (1 + (k - 1) s) = s exactly).
        official = schedule == "shifted"
        self._sched = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, solver_order=2, prediction_type="flow_prediction",
            predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
            use_flow_sigmas=True, flow_shift=shift if official else 1.0, timestep_spacing="linspace",
        )
        self._sched.set_timesteps(sigmas=base_sigmas(steps) if official else schedule_sigmas(steps, shift, schedule))
        self._sched.set_begin_index(0)  # walk the table by position, never by timestep lookup
        self.sigmas = self._sched.sigmas
        self.timesteps = self._sched.timesteps
        expected = flow_timesteps(steps, shift, schedule)
        if not torch.equal(self.timesteps.cpu(), expected):  # a diffusers change would silently alter samples
            raise RuntimeError("diffusers' UniPCMultistepScheduler no longer reproduces the official S2V "
                               "timesteps; pin diffusers to the version in pyproject.toml")
        self._i = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        out = self._sched.step(velocity.float(), self.timesteps[self._i], sample.float(), return_dict=False)[0]
        self._i += 1
        return out.to(sample.dtype)


def make_solver(name: str, steps: int, shift: float = DEFAULT_SHIFT, schedule: str = "shifted"):
    if name == "unipc":
        return UniPCFlowSolver(steps, shift, schedule)
    if name == "euler":
        return EulerFlowSolver(steps, shift, schedule)
    raise ValueError(f"solver {name!r} is not one of {', '.join(SOLVERS)}")


def guided(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance as the official loop combines the two predictions."""
    if uncond is None or scale <= 1:
        return cond
    return uncond + scale * (cond - uncond)
