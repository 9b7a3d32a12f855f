"""The frame geometry of an S2V window, and which frame counts it accepts: below the config rules and the data code.

One clip is 80 new frames (20 latents) after 73 motion frames (19 latents); the causal VAE maps 4k+1 frames to
k+1 latents (spec/S2V_MODEL.md). Kept here, with nothing of the engine imported, so that the config rules
(data.frames, data.motion_frames) and engine.data.windows ask the same function without the config importing
the data package.
"""
from __future__ import annotations

WINDOW_FRAMES = 80
MOTION_FRAMES = 73
VAE_TIME_FACTOR = 4


def window_frame_problems(frames: int, motion_frames: int) -> list[tuple[str, str, str]]:
    """Why a window of `frames` new frames after `motion_frames` motion frames cannot be encoded, as
    (which, what is wrong, fix) with which = "frames" or "motion_frames"; [] when it can.

    The new frames always follow one causal prefix, the reference frame or the 4k+1 motion frames, so they
    must be whole groups of 4 (one latent each); the frame packer takes at most 19 motion latents (73 frames).
    The config rules (data.frames, data.motion_frames) and WindowSettings both ask here, so a config that
    passes its check never fails later in the dataset code.
    """
    out = []
    if frames <= 0 or frames % VAE_TIME_FACTOR:
        near = max(VAE_TIME_FACTOR, round(frames / VAE_TIME_FACTOR) * VAE_TIME_FACTOR)
        nearest = f"use {near}, or " if near != WINDOW_FRAMES else "use "
        out.append(("frames", f"{frames} new frames are not whole latents: valid values are 4, 8, 12, ... "
                    "(a positive multiple of 4, each 4 frames one latent after the reference or motion frames)",
                    f"{nearest}{WINDOW_FRAMES} (20 latents, as inference)"))
    if motion_frames < 0 or motion_frames > MOTION_FRAMES or (motion_frames and (motion_frames - 1) % VAE_TIME_FACTOR):
        out.append(("motion_frames", f"{motion_frames} motion frames are not whole motion latents: valid values "
                    f"are 0 (none) or 1, 5, 9, ... {MOTION_FRAMES} (4k+1, at most {MOTION_FRAMES})",
                    f"use {MOTION_FRAMES} (the official 19 motion latents) or 0 to train first-clip mode only"))
    return out
