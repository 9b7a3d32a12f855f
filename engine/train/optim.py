"""Optimizers and learning-rate schedules from the [optim] section.

AdamW is torch's; AdamW 8-bit comes from bitsandbytes; Lion (lion-pytorch), Prodigy (prodigyopt) and
schedule-free AdamW (schedulefree) only where their package is installed: a missing one is an error that names
the package to install, never a silent fallback to AdamW.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "lion", "prodigy", "schedulefree")
SCHEDULES = ("constant", "cosine", "linear")

# optimizer name -> (import name, pip name)
_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "lion": ("lion_pytorch", "lion-pytorch"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "schedulefree": ("schedulefree", "schedulefree"),
}


class OptimizerUnavailable(RuntimeError):
    pass


def _require(name: str):
    module, pip_name = _PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise OptimizerUnavailable(
            f"optim.optimizer = \"{name}\" needs the '{pip_name}' package, which is not installed: "
            f"`pip install {pip_name}`, or choose optimizer = \"adamw\""
        )
    return importlib.import_module(module)


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, betas=(0.9, 0.999),
                    weight_decay: float = 0.01, eps: float = 1e-8) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the LoRA matched nothing")
    betas = tuple(betas)
    if name == "adamw":
        # foreach is deterministic and fast on CPU and GPU; fused would not run on CPU for every dtype.
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, foreach=True)
    if name == "adamw8bit":
        bnb = _require(name)
        if params[0].device.type != "cuda":
            raise OptimizerUnavailable(
                'optim.optimizer = "adamw8bit" runs on CUDA only (bitsandbytes); use "adamw" on this device'
            )
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "lion":
        lion = _require(name)
        return lion.Lion(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "prodigy":
        prodigy = _require(name)
        return prodigy.Prodigy(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "schedulefree":
        sf = _require(name)
        return sf.AdamWScheduleFree(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based): linear warmup, then the schedule."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, max_steps: int,
                    optimizer_name: str = "adamw") -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(warmup_steps, schedule, warmup_steps, max_steps)  # an unknown name fails here, not at step 1
    if optimizer_name == "schedulefree" and (schedule != "constant" or warmup_steps):
        raise ValueError(
            'optim.optimizer = "schedulefree" does its own schedule: set schedule = "constant" and '
            "warmup_steps = 0 (use the optimizer's own warmup instead)"
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, warmup_steps, max_steps)
    )
