"""Shared test helpers."""

from __future__ import annotations

from soar.step import StepSettings

PAPER_STEP = dict(lambda_aux=1.0, num_rollout_paths=1, trajectory_length=6, num_sampling_steps=40,
                  sde_rollout_type="flow_sde", sde_noise_scale=0.5, cfg_scale_sampling=4.5, sigma_upper_ratio=None,
                  aux_microbatch=None, weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0,
                  mode_scale=1.29, cond_dropout_rate=0.0)  # the paper's SOAR step settings (DESIGN.md §4)


def step_settings(**overrides) -> StepSettings:
    """The paper's step settings with ``overrides``."""
    return StepSettings(**{**PAPER_STEP, **overrides})


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
    from soar.models.tiny import TinyArch, write_tiny_model

    records = [TrainingRecord(md5=f"img{i}", caption=TRAIN_CAPTIONS[i % 4], bw=16, bh=16) for i in range(8)]
    write_tiny_model(root / "model", TinyArch(**TINY_ARCH), TRAIN_CAPTIONS, seed=0)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for r in records:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(r.image_path(root / "images"))
    return root / "model", root / "images", records
