"""A small in-memory dataset of random tensors in the cache's sample-dict contract, for tests.

Each clip has fixed latents, reference, text and audio (a function of the seed), so a LoRA can overfit it: the
loss of a few clips must fall. Shapes follow the model it is made for (text_dim, audio layers and width).
`crepa_dim` > 0 adds CREPA targets of that width on the feature grid of engine.data.crepa_features (half the
token grid per side, rounded up), as the cache gives them with crepa.enabled.
"""
from __future__ import annotations

import torch


class SyntheticLatentDataset:
    def __init__(self, clips: int = 2, *, latent_frames: int = 20, height: int = 8, width: int = 8,
                 text_dim: int = 32, audio_layers: int = 3, audio_dim: int = 32, text_tokens: int = 8,
                 with_motion: bool = True, seed: int = 0, crepa_dim: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.samples = []
        for i in range(clips):
            def rnd(*shape):
                return torch.randn(*shape, generator=gen)

            text = torch.zeros(512, text_dim)
            text[:text_tokens] = rnd(text_tokens, text_dim)
            empty = torch.zeros(512, text_dim)
            empty[:1] = rnd(1, text_dim)
            # Smooth latents (a per-channel level plus a small texture), more like a VAE latent than white noise.
            latents = rnd(16, 1, 1, 1) + 0.1 * rnd(16, latent_frames, height, width)
            self.samples.append({
                "latents": latents,
                "motion_latents": (rnd(16, 1, 1, 1) + 0.3 * rnd(16, 19, height, width)) if with_motion else None,
                "ref_latents": latents[:, :1].clone(),
                "text": text,
                "text_empty": empty,
                "audio": rnd(audio_layers, audio_dim, 4 * latent_frames),
                "clip_id": f"synthetic-{i}",
                "window": 0,
            })
            if crepa_dim:
                grid = (-(-height // 4), -(-width // 4))  # latent / 2 = tokens, tokens / 2 rounded up
                self.samples[-1]["crepa"] = rnd(latent_frames, *grid, crepa_dim)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]
