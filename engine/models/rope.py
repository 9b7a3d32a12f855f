"""3-axis rotary positions of the S2V token sequence [video | reference | motion].

Head channels are split into time : height : width pairs as d - 4(d//6) : 2(d//6) : 2(d//6) (22 : 21 : 21
complex pairs for d = 128), each axis with frequencies theta^(-2j/axis_dim), theta = 10000.

Positions (spec section 3.3):
- video: t = 0..T-1, y and x over the patch grid;
- reference: t = 30, y and x over its own patch grid;
- motion (framepack): newest frame t = -1 (full grid), the 2x token t = -3 and the 4x tokens t = -19, -14, -9, -4
  (oldest first), their y/x positions spread over the full grid by int(linspace(0, g-1, n)).
Negative times are the official code's complex conjugation of the positive table row.
"""
from __future__ import annotations

import numpy as np
import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    sixth = head_dim // 6
    return (head_dim - 4 * sixth) // 2, sixth, sixth


def _axis_freqs(pairs: int, theta: float = 10000.0) -> np.ndarray:
    axis_dim = 2 * pairs
    return 1.0 / np.power(theta, np.arange(0, axis_dim, 2, dtype=np.float64) / axis_dim)


def _grid(t_pos, y_pos, x_pos) -> np.ndarray:
    """Token positions [N, 3] in (t, y, x) order, t outermost."""
    t, y, x = np.meshgrid(np.asarray(t_pos), np.asarray(y_pos), np.asarray(x_pos), indexing="ij")
    return np.stack([t.ravel(), y.ravel(), x.ravel()], axis=1).astype(np.float64)


def _spread(full: int, n: int) -> np.ndarray:
    return np.linspace(0, full - 1, n).astype(int)


def sequence_positions(
    video_grid: tuple[int, int, int],
    ref_grid: tuple[int, int],
    motion_hw: tuple[int, int] | None,
    ref_time: int = 30,
    include_newest: bool = True,
    include_2x: bool = True,
) -> np.ndarray:
    """Positions of every token of one sample. motion_hw is the latent (h, w) of the motion frames, or None."""
    t, gh, gw = video_grid
    parts = [_grid(range(t), range(gh), range(gw)), _grid([ref_time], range(ref_grid[0]), range(ref_grid[1]))]
    if motion_hw is not None:
        lh, lw = motion_hw
        full_h, full_w = lh // 2, lw // 2
        if include_newest:
            parts.append(_grid([-1], _spread(full_h, lh // 2), _spread(full_w, lw // 2)))
        if include_2x:
            parts.append(_grid([-3], _spread(full_h, lh // 4), _spread(full_w, lw // 4)))
        parts.append(_grid([-19, -14, -9, -4], _spread(full_h, lh // 8), _spread(full_w, lw // 8)))
    return np.concatenate(parts, axis=0)


def rope_cos_sin(positions: np.ndarray, head_dim: int, device, theta: float = 10000.0):
    """Angles for positions [N, 3] -> (cos, sin), each [N, head_dim/2] fp32."""
    pt, ph, pw = axis_pairs(head_dim)
    angles = np.concatenate(
        [
            np.outer(positions[:, 0], _axis_freqs(pt, theta)),
            np.outer(positions[:, 1], _axis_freqs(ph, theta)),
            np.outer(positions[:, 2], _axis_freqs(pw, theta)),
        ],
        axis=1,
    )
    ang = torch.from_numpy(angles)
    return torch.cos(ang).float().to(device), torch.sin(ang).float().to(device)
