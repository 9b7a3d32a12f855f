"""DINOv2 features of a training window's frames, the targets of CREPA (engine.train.crepa), made in the cache phase.

What one `crepa` cache entry holds: `features` [T, gh, gw, E] for the window's T = frames / 4 target latents:
- Time: target latent j covers the window's new frames 4j .. 4j+3 in both encodings of a window (after its 73
  motion frames: 73 = 1 + 4*18, so the 20 targets start on a 4-frame boundary; after the reference frame: that
  frame is latent 0, dropped). Its features are the mean of those four frames' DINOv2 patch features.
- Space: the transformer's video tokens form a grid of (H/16, W/16) (VAE 8x, patch 2). DINOv2 sees each frame
  (already cropped to the bucket) resized, without a crop, to a patch grid of half that on each side, rounded up
  (`feature_grid`), so its patches cover the areas of 2x2 token blocks; the loss average-pools the token grid to
  the same (gh, gw) (adaptive pooling: exact 2x2 blocks for an even token side, slightly overlapping windows that
  still span the whole frame for an odd one). Half, not the full token grid: the
  full grid would store 4x the bytes (96 MB per 80-frame window at 832x480 with DINOv2-giant, against 24 MB).
- Values: the last hidden state after DINOv2's final layer norm, patch tokens only (the CLS token dropped), from
  frames scaled to [0, 1] and normalised with the ImageNet mean and std that DINOv2 was trained with.

The encoder is named by crepa.encoder, a hub id or a local folder in the transformers layout (Dinov2Model); it is
loaded only to fill missing entries and released after its pass, never during training.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

KIND = "crepa"
TOKEN_PIXELS = 16  # pixels per transformer token side: the VAE's 8x and the transformer's 2x2 patches
FRAMES_PER_LATENT = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ENCODER_FILES = ["*.json", "*.safetensors"]


def feature_grid(width: int, height: int) -> tuple[int, int]:
    """(gh, gw) of the DINOv2 patch grid for a bucket of (width, height) pixels: half the token grid, rounded up."""
    th, tw = height // TOKEN_PIXELS, width // TOKEN_PIXELS
    return -(-th // 2), -(-tw // 2)


def resolve_encoder(source: str) -> Path:
    """The local folder of crepa.encoder (fetched from the hub, config and safetensors weights only, when it is a
    hub id). Raises FileNotFoundError naming the key and the fix."""
    from engine.model_source import fetch_from_hub, require_source

    try:
        require_source(source)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"crepa.encoder: {exc}") from None
    path = Path(source).expanduser()
    folder = path if path.is_dir() else fetch_from_hub(source, _ENCODER_FILES)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"crepa.encoder {source}: no config.json in {folder}; point crepa.encoder at a "
                                "DINOv2 model folder in the transformers layout (config.json + model.safetensors)")
    return folder


def encoder_config(folder: Path) -> dict:
    """The encoder's config.json, refused unless it is a DINOv2 model."""
    raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") != "dinov2":
        raise ValueError(f"crepa.encoder {folder}: config.json has model_type {raw.get('model_type')!r}, not "
                         "'dinov2'; CREPA's features come from a DINOv2 model (e.g. facebook/dinov2-giant)")
    return raw


def feature_dim(source: str) -> int:
    """Width E of the features crepa.encoder makes (the projector's output width)."""
    return int(encoder_config(resolve_encoder(source))["hidden_size"])


def load_encoder(folder: Path, device: torch.device):
    """Dinov2Model in fp32, frozen, on `device` (the features are targets: full precision)."""
    from transformers import Dinov2Model

    encoder_config(folder)
    model = Dinov2Model.from_pretrained(folder, torch_dtype=torch.float32)
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def encode_frames(model, frames: torch.Tensor, grid: tuple[int, int], batch: int = 16) -> torch.Tensor:
    """uint8 [N, H, W, 3] frames -> [N, gh, gw, E] fp32 patch features (see the module docstring)."""
    device = next(model.parameters()).device
    patch = int(model.config.patch_size)
    gh, gw = grid
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for i in range(0, frames.shape[0], batch):
        x = frames[i:i + batch].to(device).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(gh * patch, gw * patch), mode="bicubic", align_corners=False, antialias=True)
        hidden = model(pixel_values=(x - mean) / std).last_hidden_state
        patches = hidden[:, hidden.shape[1] - gh * gw:]  # the CLS token (and any register tokens) come first
        out.append(patches.float().unflatten(1, (gh, gw)))
    return torch.cat(out)


def window_features(model, new_frames: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """[T, gh, gw, E] for the window's new frames (uint8 [4T, H, W, 3]): the mean over each latent's 4 frames."""
    n = new_frames.shape[0]
    if n % FRAMES_PER_LATENT:
        raise ValueError(f"a CREPA window needs a multiple of {FRAMES_PER_LATENT} new frames, got {n}")
    feats = encode_frames(model, torch.from_numpy(np.ascontiguousarray(new_frames)), grid)
    return feats.unflatten(0, (n // FRAMES_PER_LATENT, FRAMES_PER_LATENT)).mean(dim=1)
