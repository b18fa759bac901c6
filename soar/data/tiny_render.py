"""Rendering for the tiny world: solid shapes and short words on a plain light-gray background.

Everything is drawn at ``SUPERSAMPLE`` times the target side and box-filtered down, so edges are
anti-aliased the same way every time. Shapes are axis-aligned and fill a square box of side
``size``: a disc, a square, or an upright isosceles triangle (apex at the top centre, base at the
bottom). ``shape_coverage`` gives the same geometry analytically, for the detector.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

BACKGROUND_RGB = (200, 200, 200)
# Subset of GenEval's colour names, with RGB values far apart from each other and from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 210, 0),
    "purple": (140, 50, 180),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
REFERENCE_SIDE = 64  # sizes below are in pixels at this image side and scale linearly
MIN_OBJECT_SIZE = 14
MAX_OBJECT_SIZE = 22
OBJECT_GAP = 2  # minimum free pixels between object boxes (and to the image border)
SUPERSAMPLE = 4
TEXT_COLOR = (0, 0, 0)
TEXT_WIDTH_FRACTION = (0.7, 0.9)  # rendered word width as a fraction of the image side
TEXT_MAX_HEIGHT_FRACTION = 0.45
JPEG_QUALITY = 95
# Degradations (pixels at the reference side): strong Gaussian blur and/or heavy Gaussian noise.
BLUR_RADIUS = (1.8, 3.0)
NOISE_STD = (30.0, 55.0)
DEGRADATION_MODES = ("blur", "noise", "blur+noise")


@dataclass(frozen=True)
class SceneObject:
    """One shape: class, colour name, box centre (pixels) and box side (pixels)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Continuous box ``(x0, y0, x1, y1)`` in pixels."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def scale(image_size: int) -> float:
    """Factor from reference-side pixels to pixels at ``image_size``."""
    return image_size / REFERENCE_SIDE


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, factor: int) -> None:
    x0, y0, x1, y1 = (v * factor for v in obj.box)
    fill = PALETTE[obj.color]
    # PIL's pixel (i, j) covers [i, i+1); an inclusive end coordinate of x1 - 1 covers [x0, x1).
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")


def render_scene(objects: list[SceneObject], image_size: int) -> np.ndarray:
    """Render ``objects`` as a uint8 RGB image ``[image_size, image_size, 3]``."""
    big = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_shape(draw, obj, SUPERSAMPLE)
    return np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX))


def render_text(word: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Render ``word`` large, in black, roughly centred (random jitter), as uint8 RGB."""
    big = image_size * SUPERSAMPLE
    probe = ImageFont.load_default(size=100)
    x0, y0, x1, y1 = probe.getbbox(word)
    width_frac = rng.uniform(*TEXT_WIDTH_FRACTION)
    font_size = 100 * min(width_frac * big / (x1 - x0), TEXT_MAX_HEIGHT_FRACTION * big / (y1 - y0))
    font = ImageFont.load_default(size=max(int(font_size), 8))
    x0, y0, x1, y1 = font.getbbox(word)
    free_x, free_y = big - (x1 - x0), big - (y1 - y0)
    left = free_x / 2 + rng.uniform(-0.3, 0.3) * free_x
    top = free_y / 2 + rng.uniform(-0.3, 0.3) * free_y
    canvas = Image.new("RGB", (big, big), BACKGROUND_RGB)
    ImageDraw.Draw(canvas).text((left - x0, top - y0), word, fill=TEXT_COLOR, font=font)
    return np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX))


SHAPE_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # shape area / box area
SHAPE_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}  # centroid below box centre / side


def shape_coverage(
    shape: str, box: tuple[float, float, float, float], top: int, left: int, height: int, width: int
) -> np.ndarray:
    """Fraction of each pixel of the window ``[top, top+height) x [left, left+width)`` that ``shape``
    filling the continuous ``box`` covers (``SUPERSAMPLE**2`` samples per pixel)."""
    x0, y0, x1, y1 = box
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    v = ((top + np.arange(height)[:, None] + sub).reshape(-1)[:, None] - y0) / max(y1 - y0, 1e-9)
    u = ((left + np.arange(width)[:, None] + sub).reshape(-1)[None, :] - x0) / max(x1 - x0, 1e-9)
    if shape == "circle":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "square":
        inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    elif shape == "triangle":
        inside = (np.abs(u - 0.5) <= v / 2) & (v <= 1)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return inside.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))


def _free(box: tuple[float, ...], boxes: list[tuple[float, ...]], gap: float) -> bool:
    return all(
        box[2] + gap <= b[0] or b[2] + gap <= box[0] or box[3] + gap <= b[1] or b[3] + gap <= box[1]
        for b in boxes
    )


def place_objects(
    items: list[tuple[str, str]],
    image_size: int,
    rng: np.random.Generator,
    accept=None,
    max_tries: int = 400,
) -> list[SceneObject]:
    """Place ``(shape, colour)`` items at random sizes and positions, without overlap.

    ``accept(objects) -> bool`` can impose a layout constraint (e.g. a spatial relation). When no
    layout is found in ``max_tries`` the size range shrinks by one pixel and placement retries.
    """
    f = scale(image_size)
    gap = OBJECT_GAP * f
    hi = MAX_OBJECT_SIZE
    while hi >= MIN_OBJECT_SIZE * 0.5:
        lo = min(MIN_OBJECT_SIZE, hi)
        for _ in range(max_tries):
            objects: list[SceneObject] = []
            for shape, color in items:
                size = round(rng.uniform(lo, hi) * f)
                half = size / 2
                for _ in range(50):
                    cx = rng.uniform(half + gap, image_size - half - gap)
                    cy = rng.uniform(half + gap, image_size - half - gap)
                    # snap the box to the pixel grid so square edges are crisp
                    cx, cy = round(cx - half) + half, round(cy - half) + half
                    obj = SceneObject(shape, color, float(cx), float(cy), float(size))
                    if _free(obj.box, [o.box for o in objects], gap):
                        objects.append(obj)
                        break
                else:
                    break
            if len(objects) == len(items) and (accept is None or accept(objects)):
                return objects
        hi -= 1
    raise RuntimeError(f"cannot place {items} in a {image_size}px image")


def degrade(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Apply a random strong degradation; returns the degraded uint8 image and its mode."""
    mode = DEGRADATION_MODES[int(rng.integers(len(DEGRADATION_MODES)))]
    f = scale(image.shape[0])
    out = image
    if "blur" in mode:
        radius = rng.uniform(*BLUR_RADIUS) * f
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius)))
    if "noise" in mode:
        noise = rng.normal(0.0, rng.uniform(*NOISE_STD), size=out.shape)
        out = np.clip(out.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)
    return out, mode


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes (quality 95, no subsampling surprises: 4:4:4) of a uint8 RGB image."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()
