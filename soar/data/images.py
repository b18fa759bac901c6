"""Decoding a training image file into uint8 RGB, the same way for prepare, training and the caches.

* **16-bit** grayscale files (Pillow modes ``I;16*`` / ``I``) are scaled to 8 bits (value / 257, rounded);
  ``convert("RGB")`` would clip them to black and white.
* **Transparency** (RGBA, LA, palette or grayscale with a transparent colour) is composited over white;
  ``convert("RGB")`` would keep whatever colour the transparent pixels happen to store (often black).
* **Pixel budget**: an image above ``MAX_PIXELS`` is downscaled on load (aspect kept, bicubic; JPEGs are
  decoded at a reduced scale first), so no later step (quality filter, resize) holds more than the budget.
  Beyond Pillow's own decompression-bomb limit the file is refused, with its size.

Any file that cannot be decoded is an ``ImageLoadError`` naming it; nothing is ever substituted.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

RESAMPLE = Image.Resampling.BICUBIC
MAX_PIXELS = 4096 * 4096  # 16.8 MP: larger images are downscaled on load (the paper trains on ~512^2 crops)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
WHITE = (255, 255, 255)


class ImageLoadError(OSError):
    """An image that is missing or cannot be decoded; the message names the file."""


def fit_budget(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest ``(w, h)`` with the aspect of ``width x height`` and at most ``max_pixels`` pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: 16-bit scaled, transparency composited over white, other modes converted."""
    if image.mode in SIXTEEN_BIT_MODES:
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file fully into uint8 RGB ``[H, W, 3]`` (module doc); ``ImageLoadError`` naming it if not."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            size = fit_budget(*image.size, max_pixels)
            if size != image.size:
                image.draft("RGB", size)  # JPEG: decode at 1/2 .. 1/8 scale, at least ``size``; others: no-op
                return np.asarray(to_rgb(image).resize(size, RESAMPLE))
            return np.asarray(to_rgb(image))
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc} (Pillow's decompression-bomb limit; downscale "
                             "the file)") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc
