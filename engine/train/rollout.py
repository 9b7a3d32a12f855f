"""Scheduled sampling ("rollout", [rollout]): train some windows on the model's own denoising, against exposure bias.

Plain flow matching trains on x_t = (1 - t) x0 + t eps, a point exactly on the noising path; at inference the
model only ever sees points its own earlier steps made, with their errors. With rollout, a window (chance
`probability`, drawn per window) is instead noised to a higher level t' and brought down to t by the model itself:

    k      ~ uniform{0, ..., max_step_offset}          timesteps of the model's 1000-step scale (timestep = 1000 t)
    t'     = min(t + k / 1000, 1)
    x      = (1 - t') x0 + t' eps                      the same eps as the training target's
    k times (no grad, LoRA on, the step's autocast):  x <- x + (t_next - t_cur) v(x, t_cur), t_cur from t' to t
    input  = x at t;  target = eps - x0 (unchanged);  timestep = 1000 t (unchanged)

This follows the seed (SimpleTuner, documentation/experimental/SCHEDULED_SAMPLING.md and its flow-matching rollout
in helpers/scheduled_sampling/rollout.py): an offset drawn uniformly in [0, max_step_offset] per window, applied
with the per-window probability, one Euler step per timestep of the offset, the rollout's end replacing the noisy
input while the loss target stays the velocity of the true x0 and noise, and the model's timestep set to the
trained one. Its defaults (offset 0 and probability 0 meaning off) become `enabled = false`; the values used when
on are those of its basic setup (offset 10, probability 1.0). Not taken from it: its ramp of the probability and
its biased offset strategies, and ReflexFlow (extra loss terms the seed turns on by default for flow-matching
models with rollout): here the loss stays the plain MSE to eps - x0. The seed divides timesteps by 999 for the
path and by 1000 for the model; here both use the model's scale, t = timestep / 1000.

Cost: a window with offset k costs k extra forward passes without grad (no activations are kept: with grad off the
transformer runs its blocks plainly, never through a checkpoint or the host store). At batch 1, offsets uniform in
0..10 average 5 extra forwards a step at probability 1; a checkpointed training step is about four forwards' work
(forward, recompute, backward twice that), so the step takes about 9/4 of its time: an estimate until
bench/engine_step.py measures it at 14B (it reports each step's forwards beside its time).

The batch is stepped as a whole max(k) times over the global batch, samples already at t kept as they are, so
every step's forward has the same shape and every rank runs the same number of forwards (FSDP gathers the weights
of each block in each of them). Compiled blocks (memory.compile_blocks) make one more graph per compiled module
kind for the no-grad forward, once (4 -> 7 unique graphs on the tiny model; dynamo guards on grad mode), never one
per step. So rollout combines with every memory switch and both strategies, and engine.train.allowed refuses
nothing for it.

The model stays in training mode for the rollout, as in the seed: the same modules and numerics as the training
forward (with lora.dropout > 0 its dropout applies there too, drawing from torch's RNG, which checkpoints keep).

Randomness: the probability and offset draws come from the loop's noise generator, after the sigmas and noise of
the micro-batch and for the whole global batch, two draws per window whatever comes out, so a resumed run draws
exactly what an uninterrupted one would. With rollout off, or probability 0, nothing is drawn and the training
input is the plain noising, bit for bit.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.config import RolloutConfig
from engine.train.objective import noisy_input

log = logging.getLogger(__name__)

TIMESTEP = 1.0 / 1000  # one step of the model's timestep scale (engine.train.objective.sigmas_to_timesteps)

# (noisy input [B, ...], sigmas [B]) -> predicted velocity [B, ...]: the model with the step's conditioning.
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def draw_offsets(n: int, generator: torch.Generator, probability: float, max_step_offset: int) -> torch.Tensor:
    """[n] offsets in timesteps (0 = this window is noised plainly), drawn on the generator's device. Both draws
    are made for every window, so the generator advances the same whatever the outcome."""
    device = generator.device
    chosen = torch.rand(n, generator=generator, device=device) < probability
    offsets = torch.randint(0, max_step_offset + 1, (n,), generator=generator, device=device)
    return torch.where(chosen, offsets, torch.zeros_like(offsets))


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def rollout_input(predict: Predict, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                  offsets: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """The training input at `sigmas` reached by the model's own Euler steps from `offsets` timesteps higher.

    `steps`: how many forwards to run (at least max(offsets)); several processes pass the global batch's maximum
    so that all run the same number. A window whose offset is used up is carried unchanged, and one of offset 0
    is exactly noisy_input(x0, noise, sigmas). No autograd graph is built (the result is a constant input)."""
    most = int(offsets.max())  # before the move: no device sync for it
    offsets = offsets.to(sigmas.device)
    steps = most if steps is None else steps
    if steps < most:
        raise ValueError(f"a rollout of {steps} steps cannot cover an offset of {most} timesteps")
    start = torch.clamp(sigmas + offsets * TIMESTEP, max=1.0)
    # Equal steps from t' down to t: one timestep each, shorter only where t' was capped at pure noise.
    size = (start - sigmas) / offsets.clamp(min=1)
    x = noisy_input(x0, noise, start).float()
    for j in range(steps):
        active = offsets > j
        current = torch.where(active, start - j * size, sigmas)
        # The last step lands on t exactly, not on t' - k * size with its rounding.
        following = torch.where(offsets > j + 1, start - (j + 1) * size, sigmas)
        velocity = predict(x.to(x0.dtype), current).float()
        stepped = x + _per_sample(following - current, x) * velocity
        x = torch.where(_per_sample(active, x), stepped, x)
    return x.to(x0.dtype)


def training_input(config: RolloutConfig, generator: torch.Generator, predict: Predict, x0: torch.Tensor,
                   noise: torch.Tensor, sigmas: torch.Tensor, global_size: int = 0,
                   part: slice = slice(None)) -> torch.Tensor:
    """The noisy input the loss is computed on: the plain noising, or with [rollout] on the rollout's end for the
    windows drawn for it. `global_size` windows are drawn for (0: this batch is the global batch) and this
    process keeps `part` of them, as the loop does for sigmas and noise."""
    if not config.enabled or config.probability == 0.0:
        return noisy_input(x0, noise, sigmas)
    offsets = draw_offsets(global_size or x0.shape[0], generator, config.probability, config.max_step_offset)
    steps = int(offsets.max())
    # One line per micro-batch at debug level: bench/engine_step.py reads the forwards of each step from it.
    log.debug("rollout: %d no-grad forwards (offsets %s)", steps, offsets.tolist())
    if steps == 0:
        return noisy_input(x0, noise, sigmas)
    return rollout_input(predict, x0, noise, sigmas, offsets[part], steps=steps)
