"""CREPA (cross-frame representation alignment): a loss term that aligns one block's hidden states to DINOv2.

    h        = output of transformer block crepa.block_index, video tokens only, [B, T, th, tw, D]
               (the reference and motion tokens that follow them in the sequence are left out)
    h'       = h average-pooled over its token grid to the cached DINOv2 patch grid [B, T, gh, gw, D]
    z        = projector(h')  [B, T, gh, gw, E]   (LayerNorm, Linear D->E, SiLU, Linear E->E; trained)
    s(f, g)  = mean over the grid's patches of cos(z[f, patch], y[g, patch]),  y = the cached features
    S(f)     = sum over |k| <= d of w_k s(f, f+k) / sum of the same w_k, over the k with f+k inside the window;
               w_k = exp(-|k| / temporal_decay), d = crepa.adjacent_distance (w_0 = 1)
    term     = crepa.weight * (1 - mean over B and f of S(f))

The pooling comes before the projector so that it runs on 4x fewer tokens. Frame f of the hidden states is target
latent f, whose features are those of the window's new frames 4f .. 4f+3 (engine.data.crepa_features).

The projector is trained with the LoRA by the same optimizer, saved in every checkpoint and restored on resume; it
is not part of the transformer, so no LoRA file ever holds it. Its initial weights come from its own generator
seeded by train.seed, so a fresh run starts the same whatever was drawn before.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CrepaProjector(nn.Module):
    def __init__(self, dim: int, feature_dim: int, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG: leave it as it was
            self.norm = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, feature_dim)
            self.fc2 = nn.Linear(feature_dim, feature_dim)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for fc in (self.fc1, self.fc2):
                bound = 1.0 / math.sqrt(fc.in_features)  # nn.Linear's own range, drawn from our generator
                fc.weight.uniform_(-bound, bound, generator=gen)
                fc.bias.uniform_(-bound, bound, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(self.norm(x))))


def pool_tokens(hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, T, th, tw, D] -> [B, T, gh, gw, D] by adaptive average pooling over (th, tw)."""
    b, t = hidden.shape[:2]
    x = hidden.flatten(0, 1).permute(0, 3, 1, 2)
    x = F.adaptive_avg_pool2d(x, grid)
    return x.permute(0, 2, 3, 1).unflatten(0, (b, t))


def frame_weights(distance: int, decay: float) -> dict[int, float]:
    """{offset k: exp(-|k| / decay)} for every |k| <= distance."""
    return {k: math.exp(-abs(k) / decay) for k in range(-distance, distance + 1)}


def mean_similarity(projected: torch.Tensor, features: torch.Tensor, distance: int, decay: float) -> torch.Tensor:
    """The mean over batch and frames of S(f) (module docstring); both inputs [B, T, gh, gw, E]."""
    z = F.normalize(projected.float().flatten(2, 3), dim=-1)  # [B, T, P, E]
    y = F.normalize(features.float().flatten(2, 3), dim=-1)
    t = z.shape[1]
    num = z.new_zeros(z.shape[:2])
    den = z.new_zeros(t)
    for k, w in frame_weights(min(distance, t - 1), decay).items():
        lo, hi = max(0, -k), min(t, t - k)  # frames f whose neighbour f + k is in the window
        sim = (z[:, lo:hi] * y[:, lo + k:hi + k]).sum(dim=-1).mean(dim=-1)  # [B, hi - lo]
        num[:, lo:hi] += w * sim
        den[lo:hi] += w
    return (num / den).mean()


class CrepaTerm:
    """The projector and the loss term of a run with crepa.enabled."""

    def __init__(self, config, dim: int, feature_dim: int, device: torch.device) -> None:
        r = config.crepa
        self.weight, self.distance, self.decay = r.weight, r.adjacent_distance, r.temporal_decay
        self.block_index = r.block_index
        self.projector = CrepaProjector(dim, feature_dim, config.train.seed + 3).to(device)
        self.last_similarity = float("nan")  # logged with the metrics (engine.train.loop)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters())

    def loss(self, hidden: torch.Tensor | None, features: torch.Tensor | None) -> torch.Tensor:
        if hidden is None:
            raise RuntimeError(f"CREPA: block {self.block_index} left no hidden state in this forward (is "
                               "crepa.block_index a block of this model?)")
        if features is None:
            raise RuntimeError("CREPA: the batch has no DINOv2 features; a dataset for a run with crepa.enabled "
                               "must give each sample its 'crepa' tensor (the cache does)")
        if features.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"CREPA: features for {features.shape[1]} latent frames, hidden states for "
                             f"{hidden.shape[1]}; the cached features do not belong to these windows")
        with torch.autocast(hidden.device.type, enabled=False):  # a small fp32 head: no rounding of its update
            pooled = pool_tokens(hidden.float(), tuple(features.shape[2:4]))
            similarity = mean_similarity(self.projector(pooled), features, self.distance, self.decay)
        self.last_similarity = float(similarity.detach())
        return self.weight * (1.0 - similarity)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.projector.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.projector.load_state_dict(state)


def crepa_term(config, model: nn.Module, device: torch.device) -> CrepaTerm | None:
    """The CREPA term of a run (None when crepa.enabled is off); tells `model` to keep the block's output."""
    if not config.crepa.enabled:
        model.capture_block = -1
        return None
    from engine.data.crepa_features import feature_dim

    blocks = len(model.blocks)
    if not 0 <= config.crepa.block_index < blocks:
        raise ValueError(f"crepa.block_index = {config.crepa.block_index}: this model has {blocks} blocks "
                         f"(0 .. {blocks - 1}); choose one of them")
    model.capture_block = config.crepa.block_index
    return CrepaTerm(config, model.inner_dim, feature_dim(config.crepa.encoder), device)
