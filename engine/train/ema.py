"""Exponential moving average of the LoRA weights, kept in fp32 on the weights' device.

With `update_every = N` the average takes the live weights at every Nth optimizer update only (the decay applies
per EMA update), which costs less on big adapters and averages over a longer span for the same decay. The count
of updates since the start is part of the state, so a resumed run updates at the same steps as an uninterrupted
one."""
from __future__ import annotations

from collections.abc import Sequence

import torch


class LoraEma:
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, update_every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema.decay must be in (0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"optim.ema.update_every must be at least 1, got {update_every}")
        self.decay = decay
        self.update_every = update_every
        self.optimizer_steps = 0  # optimizer updates seen (skipped non-finite steps are not updates)
        self.params = list(params)
        self.shadow = [p.detach().float().clone() for p in self.params]

    def after_optimizer_step(self) -> bool:
        """Count one optimizer update; average the weights when it is an Nth one. Returns whether it did."""
        self.optimizer_steps += 1
        if self.optimizer_steps % self.update_every:
            return False
        self.update()
        return True

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow], "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the LoRA {len(self.shadow)}")
        self.shadow = [s.to(p.device, torch.float32) for s, p in zip(state["shadow"], self.params, strict=True)]
        # A checkpoint written before the counter existed comes from update_every = 1, where the count is unused.
        self.optimizer_steps = int(state.get("optimizer_steps", 0))

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to undo): used to export the average."""
        for p, s in zip(self.params, self.shadow, strict=True):
            live = p.detach().float().clone()
            p.copy_(s.to(p.dtype))
            s.copy_(live)
