"""Exponential moving average of the LoRA weights, kept in fp32 on the weights' device."""
from __future__ import annotations

from collections.abc import Sequence

import torch


class LoraEma:
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = list(params)
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the LoRA {len(self.shadow)}")
        self.shadow = [s.to(p.device, torch.float32) for s, p in zip(state["shadow"], self.params, strict=True)]

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to undo): used to export the average."""
        for p, s in zip(self.params, self.shadow, strict=True):
            live = p.detach().float().clone()
            p.copy_(s.to(p.dtype))
            s.copy_(live)
