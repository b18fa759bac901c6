"""Validation images during training: fixed prompts and seeds, sampled with the current weights every N steps.

The trainer calls ``validation_images`` on the main process only, at every multiple of
``train.validation_steps``, and hands the images to a callback (``pipeline.training`` logs them to
MLflow as ``validation/step_XXXXXX.png``). Image i uses seed ``image_seed(seed, i, 0)`` and the
prompts' text embeddings come from the run's text table (no text encoder is needed), so the same
weights give the same images. Sampling draws from its own CPU generators, never from the training
generator, so turning validation on does not change the trained weights.
"""

from __future__ import annotations

import numpy as np

from soar.euler import image_seed, sample_embeds, sampling_sigmas
from soar.train_config import ValidationConfig


def validation_seeds(cfg: ValidationConfig) -> list[int]:
    """Image i's seed: ``image_seed(validation_seed, i, 0)``."""
    return [image_seed(cfg.validation_seed, i, 0) for i in range(len(cfg.validation_prompts))]


def validation_images(bundle, transformer, table, cfg: ValidationConfig) -> np.ndarray:
    """uint8 RGB ``[N, H, W, 3]`` for ``cfg.validation_prompts`` with ``transformer`` (left in train mode after)."""
    was_training = transformer.training
    try:
        embeds, pooled = table.lookup([*cfg.validation_prompts, ""], next(transformer.parameters()).device)
        return sample_embeds(transformer, bundle.codec, sampling_sigmas(bundle, cfg.validation_num_inference_steps),
                             embeds, pooled, validation_seeds(cfg), guidance_scale=cfg.validation_guidance_scale,
                             resolution=cfg.validation_resolution)
    finally:
        transformer.train(was_training)

