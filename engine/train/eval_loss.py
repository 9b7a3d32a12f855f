"""The evaluation loss: the training objective on fixed (window, sigma, noise) triples, the number to compare
runs and steps by.

The training loss of a step is one random window at one random sigma with random noise, so its curve is noisy
even when smoothed. Here every term is fixed for the whole run (a function of the seed and the dataset alone):
windows spread evenly over the dataset, sigmas at evenly spaced quantiles of the training sigma distribution
(logit-normal or uniform, then shifted), noise from a seeded generator per triple. The same weights give the same
number, bit for bit on the CPU, wherever and whenever it is computed.

The windows are those of the clips held out by validation.eval_loss.holdout and validation.eval_loss.datasets
(engine.data.holdout), which never train, so the number measures generalisation; without either they are training
windows and it measures fit.
Captions are never dropped and motion is used where the window has it.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from engine.train.objective import (auto_shift, flow_loss, noisy_input, shift_sigmas, sigmas_to_timesteps,
                                    velocity_target)


@dataclass(frozen=True)
class EvalTriple:
    index: int  # dataset index of the window
    sigma: float  # shifted sigma; with train.flow_schedule_auto_shift the unshifted quantile (shifted per window)
    noise_seed: int


def quantile_sigmas(n: int, mode: str, shift: float, mean: float = 0.0, std: float = 1.0) -> list[float]:
    """n shifted sigmas at the (i + 0.5) / n quantiles of the training distribution."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if mode == "logit_normal":
        raw = torch.sigmoid(mean + std * torch.special.ndtri(q))
    elif mode == "uniform":
        raw = q
    else:
        raise ValueError(f"sigma sampling {mode!r} is not one of logit_normal, uniform")
    return shift_sigmas(raw, shift).tolist()


def make_triples(dataset_size: int, n: int, seed: int, mode: str, shift: float, mean: float = 0.0,
                 std: float = 1.0) -> list[EvalTriple]:
    if dataset_size < 1:
        raise ValueError("the evaluation loss needs at least one window in the dataset")
    sigmas = quantile_sigmas(n, mode, shift, mean, std)
    # Windows spread over the dataset; with more triples than windows each window meets several sigmas.
    indices = [round(i * (dataset_size - 1) / max(n - 1, 1)) for i in range(n)] if n <= dataset_size else \
        [i % dataset_size for i in range(n)]
    # Pair sigmas with windows by a seeded shuffle, so a window does not always get the same noise level range.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [EvalTriple(indices[i], sigmas[order[i]], seed * 1009 + i) for i in range(n)]


@torch.no_grad()
def evaluation_loss(model, dataset, triples: list[EvalTriple], device: torch.device,
                    autocast_dtype: torch.dtype | None = None, shift_by_size: bool = False) -> float:
    """Mean flow-matching loss over the triples (see evaluation_losses)."""
    losses = evaluation_losses(model, dataset, triples, device, autocast_dtype, shift_by_size)
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluation_losses(model, dataset, triples: list[EvalTriple], device: torch.device,
                      autocast_dtype: torch.dtype | None = None, shift_by_size: bool = False) -> list[float]:
    """The flow-matching loss of each triple, in order; the model is in eval mode for the call. `shift_by_size`:
    the triples' sigmas are unshifted and get the shift of their window's size, as training draws them."""
    was_training = model.training
    model.eval()
    losses = []
    try:
        for triple in triples:
            sample = dataset[triple.index]
            x0 = torch.as_tensor(sample["latents"], dtype=torch.float32)[None]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(triple.noise_seed))
            sigma = torch.tensor([triple.sigma], dtype=torch.float32)
            if shift_by_size:  # train.flow_schedule_auto_shift
                sigma = shift_sigmas(sigma, auto_shift(*x0.shape[-2:]))
            x0, noise, sigma = x0.to(device), noise.to(device), sigma.to(device)
            motion = sample["motion_latents"]
            motion = None if motion is None else torch.as_tensor(motion, dtype=torch.float32)[None].to(device)
            amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
            with amp:
                prediction = model(
                    noisy_input(x0, noise, sigma), sigmas_to_timesteps(sigma),
                    torch.as_tensor(sample["text"], dtype=torch.float32)[None].to(device),
                    torch.as_tensor(sample["ref_latents"], dtype=torch.float32)[None].to(device),
                    torch.as_tensor(sample["audio"], dtype=torch.float32)[None].to(device),
                    motion_latents=motion, drop_motion_frames=motion is None,
                )
            losses.append(float(flow_loss(prediction, velocity_target(x0, noise))))
    finally:
        model.train(was_training)
    return losses
