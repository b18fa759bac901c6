"""Shared test helpers."""

from __future__ import annotations

import dataclasses

from soar.flow import FlowMatchingConfig
from soar.rollout import SoarConfig
from soar.step import StepSettings
from soar.train_config import TrainConfig

FLOW_KEYS = {f.name for f in dataclasses.fields(FlowMatchingConfig)}


def step_settings(**overrides) -> StepSettings:
    """The paper's SOAR step (the ``soar`` defaults, logit-normal times, no condition dropout) with ``overrides``
    of keys of either section (``FlowMatchingConfig`` or ``SoarConfig``)."""
    flow = {"cond_dropout_rate": 0.0, **{k: v for k, v in overrides.items() if k in FLOW_KEYS}}
    soar = {k: v for k, v in overrides.items() if k not in FLOW_KEYS}
    return StepSettings(FlowMatchingConfig(**flow), SoarConfig(**soar))


def train_config(**overrides) -> TrainConfig:
    """A test loop: ``TrainConfig`` without snapshots, checkpoint pruning, validation or prompt dropout, with
    ``overrides``."""
    return TrainConfig(**{"snapshot_steps": 0, "checkpoints_total_limit": None, "validation_steps": 0,
                          "cond_dropout_rate": 0.0, **overrides})


TINY_ARCH = dict(sample_size=16, patch_size=4, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                 joint_attention_dim=32, pooled_projection_dim=32, caption_projection_dim=16, qk_norm="rms_norm",
                 text_hidden_size=16, text_layers=1, text_max_length=12, shift=3.0)  # seconds-scale test model
TRAIN_CAPTIONS = ["a photo of a red circle", "a photo of two blue squares", 'a sign that says "CAT"',
                  "a photo of a green triangle"]


def write_tiny_training_world(root):
    """A tiny model folder and 8 random 16x16 training images under ``root``: ``(model_dir, image_dir, records)``."""
    import numpy as np
    from PIL import Image

    from soar.data.jsonl import TrainingRecord
    from soar.models.tiny import TinyModelConfig, write_tiny_model

    records = [TrainingRecord(md5=f"img{i}", caption=TRAIN_CAPTIONS[i % 4], bw=16, bh=16) for i in range(8)]
    write_tiny_model(root / "model", TinyModelConfig(**TINY_ARCH), TRAIN_CAPTIONS, seed=0)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for r in records:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(r.image_path(root / "images"))
    return root / "model", root / "images", records
