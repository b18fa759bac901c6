"""An exact object detector for the tiny world (``soar.data.tiny_world``), in numpy.

1. **Colour and coverage per pixel.** A rendered pixel is a blend ``bg + a * (c - bg)`` of the
   background and one palette colour ``c`` (anti-aliased edges have ``0 < a < 1``). The pixel's colour
   is the palette colour whose direction from the background best matches ``pixel - bg`` (cosine), and
   its coverage ``a`` is the projection on that direction. Pixels more than half covered (and farther
   from the background than the noise floor) are foreground.
2. **Components.** 4-connected foreground pixels of the same colour (min-label propagation with
   pointer jumping, vectorised); components smaller than ``MIN_AREA_FRACTION`` of the smallest
   object are dropped.
3. **Class, box and confidence.** Each component's coverage (its pixels grown by one pixel, so the
   anti-aliased rim counts) gives an area and a centroid; for each class these fix the one square box
   the ideal shape would fill (area / fill ratio, centroid offset of the triangle). The class is the
   best soft IoU between observed and ideal coverage; the box is that fit. Confidence =
   ``shape fit * colour purity``: shape fit maps the soft IoU linearly from ``[IOU_CHANCE,
   IOU_PERFECT]`` to ``[0, 1]`` (a stretched, merged, ragged or hollow blob fits badly), colour purity
   is the fraction of pixels whose colour direction matches the palette colour. A clean rendered
   object scores >= 0.95 at 64 px.
"""

from __future__ import annotations

import numpy as np

from soar.data.tiny_render import (
    BACKGROUND_RGB,
    MIN_OBJECT_SIZE,
    PALETTE,
    REFERENCE_SIDE,
    SHAPE_CENTROID_DROP,
    SHAPE_FILL,
    SHAPES,
    shape_coverage,
)
from soar.rewards.geneval_rules import Detection

COLOR_NAMES = tuple(PALETTE)
_BG = np.asarray(BACKGROUND_RGB, dtype=np.float64)
_DIRS = np.asarray([PALETTE[c] for c in COLOR_NAMES], dtype=np.float64) - _BG  # [K, 3]
_DIR_NORMS = np.linalg.norm(_DIRS, axis=1)
COVERAGE_THRESHOLD = 0.5  # pixel belongs to the shape when more than half covered
NOISE_FLOOR = 25.0  # grey levels: closer than this to the background is background
MIN_AREA_FRACTION = 0.25  # components below this fraction of the smallest triangle's area are dropped
IOU_CHANCE = 0.5  # soft IoU at or below which the shape fit is 0
IOU_PERFECT = 0.95  # soft IoU at or above which it is 1 (rendering and JPEG cost a few percent)
COLOR_COS_MIN = 0.95  # a pixel is "pure" when its direction from the background is this close
FIT_MARGIN = 0.5  # window around a component for the fit, in component sides (plus 2 pixels)


def label_components(valid: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Labels ``0..n-1`` of 4-connected components of ``valid`` pixels with equal ``key``; -1 elsewhere."""
    h, w = valid.shape
    none = h * w
    lab = np.where(valid, np.arange(h * w).reshape(h, w), none)
    join_x = valid[:, :-1] & valid[:, 1:] & (key[:, :-1] == key[:, 1:])
    join_y = valid[:-1] & valid[1:] & (key[:-1] == key[1:])
    while True:
        new = lab.copy()
        m = np.where(join_x, np.minimum(lab[:, :-1], lab[:, 1:]), none)
        new[:, :-1] = np.minimum(new[:, :-1], m)
        new[:, 1:] = np.minimum(new[:, 1:], m)
        m = np.where(join_y, np.minimum(lab[:-1], lab[1:]), none)
        new[:-1] = np.minimum(new[:-1], m)
        new[1:] = np.minimum(new[1:], m)
        flat = new.reshape(-1)
        inside = flat < none
        flat[inside] = flat[flat[inside]]  # pointer jumping: a label is a pixel of the same component
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.full(h * w, -1, dtype=np.int64)
    flat = lab.reshape(-1)
    inside = flat < none
    out[inside] = np.unique(flat[inside], return_inverse=True)[1]
    return out.reshape(h, w)


def _grow(mask: np.ndarray) -> np.ndarray:
    """Dilate a boolean mask by one pixel (3x3)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    return grown


def fit_shape(observed: np.ndarray, top: int, left: int) -> tuple[str, float, tuple[float, ...]]:
    """Best ``(class, soft IoU, box)`` for an observed coverage window whose corner is ``(top, left)``."""
    area = float(observed.sum())
    h, w = observed.shape
    cy = float((observed.sum(axis=1) * (np.arange(h) + 0.5)).sum()) / area + top
    cx = float((observed.sum(axis=0) * (np.arange(w) + 0.5)).sum()) / area + left
    best: tuple[str, float, tuple[float, ...]] = ("", -1.0, ())
    for shape in SHAPES:
        side = float(np.sqrt(area / SHAPE_FILL[shape]))
        by = cy - SHAPE_CENTROID_DROP[shape] * side
        box = (cx - side / 2, by - side / 2, cx + side / 2, by + side / 2)
        ideal = shape_coverage(shape, box, top, left, h, w)
        iou = float(np.minimum(observed, ideal).sum() / max(np.maximum(observed, ideal).sum(), 1e-9))
        if iou > best[1]:
            best = (shape, iou, box)
    return best


class TinyDetector:
    """Detects tiny-world shapes in uint8 RGB images of side ``image_size``."""

    def __init__(self, image_size: int = REFERENCE_SIDE) -> None:
        self.image_size = image_size
        side = MIN_OBJECT_SIZE * image_size / REFERENCE_SIDE
        self.min_area = MIN_AREA_FRACTION * 0.5 * side * side

    def pixel_colors(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pixel: palette index, coverage of that colour, cosine to its direction."""
        diff = np.asarray(image, dtype=np.float64) - _BG
        dist = np.linalg.norm(diff, axis=-1)
        proj = diff @ _DIRS.T  # [H, W, K]
        cos = proj / (np.maximum(dist, 1e-6)[..., None] * _DIR_NORMS)
        idx = np.argmax(cos, axis=-1)
        best_cos = np.take_along_axis(cos, idx[..., None], axis=-1)[..., 0]
        coverage = np.take_along_axis(proj, idx[..., None], axis=-1)[..., 0] / _DIR_NORMS[idx] ** 2
        coverage = np.where(dist > NOISE_FLOOR, coverage, 0.0)
        return idx, coverage, best_cos

    def detect(self, image: np.ndarray) -> list[Detection]:
        """All shape detections in one uint8 RGB image ``[H, W, 3]``, most confident first."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        idx, coverage, cos = self.pixel_colors(image)
        labels = label_components(coverage > COVERAGE_THRESHOLD, idx)
        n = int(labels.max()) + 1
        if n == 0:
            return []
        flat = labels.reshape(-1)
        inside = flat >= 0
        comp = flat[inside]
        ys, xs = np.divmod(np.nonzero(inside)[0], image.shape[1])
        area = np.bincount(comp, minlength=n)
        y0, x0 = np.full(n, image.shape[0]), np.full(n, image.shape[1])
        y1, x1 = np.full(n, -1), np.full(n, -1)
        for lo, hi, coord in ((y0, y1, ys), (x0, x1, xs)):
            np.minimum.at(lo, comp, coord)
            np.maximum.at(hi, comp, coord)
        pure = np.bincount(comp, weights=(cos.reshape(-1)[inside] >= COLOR_COS_MIN), minlength=n)
        color_of = np.zeros(n, dtype=np.int64)
        color_of[comp] = idx.reshape(-1)[inside]
        detections = []
        cover = np.clip(coverage, 0.0, 1.0)
        for k in np.nonzero(area >= self.min_area)[0]:
            m = 2 + int(FIT_MARGIN * max(y1[k] - y0[k] + 1, x1[k] - x0[k] + 1))
            top, left = max(int(y0[k]) - m, 0), max(int(x0[k]) - m, 0)
            win = (slice(top, min(int(y1[k]) + m + 1, labels.shape[0])),
                   slice(left, min(int(x1[k]) + m + 1, labels.shape[1])))
            support = _grow(labels[win] == k) & (idx[win] == color_of[k])
            shape, iou, box = fit_shape(np.where(support, cover[win], 0.0), top, left)
            shape_fit = np.clip((iou - IOU_CHANCE) / (IOU_PERFECT - IOU_CHANCE), 0.0, 1.0)
            confidence = shape_fit * pure[k] / area[k]
            detections.append(Detection(shape, float(confidence), tuple(map(float, box)), COLOR_NAMES[color_of[k]]))
        return sorted(detections, key=lambda d: -d.score)
