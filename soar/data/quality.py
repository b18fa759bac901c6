"""A measurable image-quality score for the tiny world: edge sharpness times a noise penalty.

``image_quality`` returns ``10 * sharpness * cleanliness`` in ``[0, 10]``:

* **sharpness** (edge acutance): at edge pixels (colour range over a ``7x7`` window above
  ``EDGE_MIN_CONTRAST``), the largest adjacent-pixel step within ``3x3`` divided by that window's
  range; the median over edge pixels is mapped linearly from ``[ACUTANCE_BLURRED, ACUTANCE_SHARP]`` to
  ``[0, 1]``. A crisp (anti-aliased) edge makes most of its contrast in one or two pixel steps
  (ratio ~0.5-1); a Gaussian blur of radius ~2 px spreads it over many (ratio ~0.2).
* **cleanliness**: ``1 / (1 + (sigma / NOISE_REFERENCE_STD) ** 2)`` with ``sigma`` a robust estimate of
  additive noise (Immerkaer's Laplacian-difference kernel, median absolute response / 0.6745 / 6,
  the kernel's gain on white noise), worst channel. Flat regions dominate the median, so edges do not
  count as noise.

Channels are treated separately (maximum over channels) so a yellow shape on the light-gray
background, which has almost no luminance contrast, still has edges. All numpy, vectorised.
"""

from __future__ import annotations

import numpy as np

EDGE_MIN_CONTRAST = 40.0
RANGE_WINDOW = 7
STEP_WINDOW = 3
ACUTANCE_BLURRED = 0.25
ACUTANCE_SHARP = 0.45
NOISE_REFERENCE_STD = 8.0
MAD_TO_STD = 0.6745
IMMERKAER_GAIN = 6.0  # L2 norm of the kernel [[1,-2,1],[-2,4,-2],[1,-2,1]]


def _window(x: np.ndarray, size: int, reduce) -> np.ndarray:
    """Separable ``size x size`` max/min filter (``reduce`` = ``np.maximum`` or ``np.minimum``)."""
    pad = size // 2
    out = x
    for axis in (0, 1):
        padded = np.pad(out, [(pad, pad) if a == axis else (0, 0) for a in range(x.ndim)], mode="edge")
        n = x.shape[axis]
        out = padded.take(range(0, n), axis=axis)
        for k in range(1, size):
            out = reduce(out, padded.take(range(k, k + n), axis=axis))
    return out


def noise_std(image: np.ndarray) -> float:
    """Robust additive-noise standard deviation (grey levels), worst channel."""
    x = np.asarray(image, dtype=np.float64)
    lap = (
        x[:-2, :-2] - 2 * x[:-2, 1:-1] + x[:-2, 2:]
        - 2 * x[1:-1, :-2] + 4 * x[1:-1, 1:-1] - 2 * x[1:-1, 2:]
        + x[2:, :-2] - 2 * x[2:, 1:-1] + x[2:, 2:]
    )
    mad = np.median(np.abs(lap).reshape(-1, x.shape[-1]), axis=0)
    return float(np.max(mad) / MAD_TO_STD / IMMERKAER_GAIN)


def acutance(image: np.ndarray) -> float:
    """Median over edge pixels of (largest nearby one-pixel step) / (local range); 0 if no edges."""
    x = np.asarray(image, dtype=np.float64)
    step = np.zeros_like(x)
    dx = np.abs(np.diff(x, axis=1))
    dy = np.abs(np.diff(x, axis=0))
    step[:, :-1] = np.maximum(step[:, :-1], dx)
    step[:, 1:] = np.maximum(step[:, 1:], dx)
    step[:-1] = np.maximum(step[:-1], dy)
    step[1:] = np.maximum(step[1:], dy)
    local_range = _window(x, RANGE_WINDOW, np.maximum) - _window(x, RANGE_WINDOW, np.minimum)
    local_step = _window(step, STEP_WINDOW, np.maximum)
    channel = np.argmax(local_range, axis=-1)[..., None]  # the channel with the most contrast
    rng = np.take_along_axis(local_range, channel, axis=-1)[..., 0]
    stp = np.take_along_axis(local_step, channel, axis=-1)[..., 0]
    edges = rng > EDGE_MIN_CONTRAST
    if not edges.any():
        return 0.0
    return float(np.median(stp[edges] / rng[edges]))


def image_quality(image: np.ndarray) -> float:
    """Quality in ``[0, 10]`` of a uint8 RGB image ``[H, W, 3]``; clean tiny-world images score ~10."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    sharp = np.clip((acutance(image) - ACUTANCE_BLURRED) / (ACUTANCE_SHARP - ACUTANCE_BLURRED), 0.0, 1.0)
    clean = 1.0 / (1.0 + (noise_std(image) / NOISE_REFERENCE_STD) ** 2)
    return float(10.0 * sharp * clean)
