"""The reference image as the official S2V inference prepares it (spec/S2V_MODEL.md §8).

Size: the largest scale of the reference's own size whose sides, each padded up to a multiple of 64, give an
area <= max_area (e.g. 832*480 = 399,360); images already small enough are only padded. The scale is searched
downwards in 100 steps from the no-padding bound (sqrt(max_area / area)) to the bound where every side pays
the worst padding (63 px), which is what makes a 16:9 picture come out at 448x832 rather than 480x832.

Pixels: the shorter side is resized (bilinear) to min(H, W) of that size, the longer side keeps the aspect
(truncated), then the picture is center-cropped to (H, W); a side shorter than the target is padded with black
on both sides (left/top get the smaller half), exactly as a torchvision Resize + CenterCrop pipeline does.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

PAD_MULTIPLE = 64
SCALE_TRIES = 100
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _padded(side: int) -> int:
    return side + (-side) % PAD_MULTIPLE


def generation_size(height: int, width: int, max_area: int) -> tuple[int, int]:
    """(H, W) of the generated video for a reference of `height` x `width`, both multiples of 64."""
    if height <= 0 or width <= 0:
        raise ValueError(f"reference image has no pixels ({width}x{height})")
    if max_area < PAD_MULTIPLE * PAD_MULTIPLE:
        raise ValueError(f"max area {max_area} is smaller than one {PAD_MULTIPLE}x{PAD_MULTIPLE} tile; "
                         "give a larger --size")
    area = height * width
    if area <= max_area:
        lo, hi = 0.1, 1.0
    else:
        d = PAD_MULTIPLE - 1
        b = d * (height + width)
        c = d * d - max_area
        # Smallest scale worth trying: the root of (s*h + d)(s*w + d) = max_area, i.e. maximal padding.
        lo = (-b + math.sqrt(b * b - 2 * area * c)) / (2 * area)
        hi = math.sqrt(max_area / area)
    for i in range(SCALE_TRIES):
        scale = hi - (hi - lo) * i / SCALE_TRIES
        h, w = _padded(int(height * scale)), _padded(int(width * scale))
        if h * w <= max_area:
            return h, w
    # No scale fitted (only for extreme aspect ratios): aspect-preserving sides rounded down to 64.
    aspect = width / height
    tw = int((max_area * aspect) ** 0.5 // PAD_MULTIPLE * PAD_MULTIPLE)
    th = int((max_area / aspect) ** 0.5 // PAD_MULTIPLE * PAD_MULTIPLE)
    if tw >= width or th >= height:
        tw, th = int(width // PAD_MULTIPLE * PAD_MULTIPLE), int(height // PAD_MULTIPLE * PAD_MULTIPLE)
    return th, tw


def fit_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [height, width, 3]: shorter side resized to min(height, width), center crop/pad."""
    from PIL import Image

    src_h, src_w = image.shape[:2]
    short = min(height, width)
    if src_w <= src_h:
        new_w, new_h = short, int(short * src_h / src_w)
    else:
        new_w, new_h = int(short * src_w / src_h), short
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    # Pad first (black), splitting the excess with the smaller half on the left/top.
    pad_h, pad_w = max(0, height - new_h), max(0, width - new_w)
    if pad_h or pad_w:
        resized = np.pad(resized, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    h, w = resized.shape[:2]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return np.ascontiguousarray(resized[top:top + height, left:left + width])


def load_reference_image(path: str | Path) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file, or of the first frame of a video file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference image {path} does not exist: give an image (or video) file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    from engine.data.media import decode_frames

    return decode_frames(path, [0.0])[0]


def reference_pixels(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """The fitted reference as the VAE input [1, 3, 1, height, width] in [-1, 1]."""
    fitted = fit_reference(image, height, width)
    x = torch.tensor(fitted, dtype=torch.float32).div(255.0).permute(2, 0, 1)  # a copy: PIL arrays are read-only
    return (x * 2 - 1)[None, :, None]
