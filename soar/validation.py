"""Validation images during training: fixed prompts and seeds, sampled with the current weights every N steps.

The trainer calls ``validation_images`` on the main process only, at every multiple of
``ValidationSettings.every``, and hands the images to a callback (``pipeline.training`` logs them to
MLflow as ``validation/step_XXXXXX.png``). Image i uses seed ``image_seed(seed, i, 0)`` and the
prompts' text embeddings come from the run's text table (no text encoder is needed), so the same
weights give the same images. Sampling draws from its own CPU generators, never from the training
generator, so turning validation on does not change the trained weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from soar.euler import image_seed, sample_embeds, sampling_sigmas


@dataclass(frozen=True)
class ValidationSettings:
    """Fields as the ``validation_*`` keys of ``pipeline.config.TrainConfig``."""

    every: int  # sample every this many optimiser steps (0 = off)
    prompts: tuple[str, ...]  # fixed prompts, one image each
    steps: int  # Euler steps per image
    guidance_scale: float  # CFG scale
    resolution: int  # image side, pixels
    seed: int  # base seed; image i uses image_seed(seed, i, 0)

    @property
    def enabled(self) -> bool:
        return self.every > 0 and len(self.prompts) > 0

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def seeds(self) -> list[int]:
        return [image_seed(self.seed, i, 0) for i in range(len(self.prompts))]


def validation_images(bundle, transformer, table, settings: ValidationSettings) -> np.ndarray:
    """uint8 RGB ``[N, H, W, 3]`` for ``settings.prompts`` with ``transformer`` (left in train mode after)."""
    was_training = transformer.training
    try:
        embeds, pooled = table.lookup([*settings.prompts, ""], next(transformer.parameters()).device)
        return sample_embeds(transformer, bundle.codec, sampling_sigmas(bundle, settings.steps), embeds, pooled,
                             settings.seeds(), guidance_scale=settings.guidance_scale, resolution=settings.resolution)
    finally:
        transformer.train(was_training)


def image_grid(images: np.ndarray | Sequence[np.ndarray], columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Images ``[N, H, W, 3]`` side by side (``columns`` per row, default all in one row), white gaps."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = min(columns or n, n)
    rows = -(-n // cols)
    grid = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = img
    return grid
