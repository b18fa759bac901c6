"""A GRPO run on a tiny model for the tests, one or several processes (``torchrun`` / ``accelerate launch``).

``python tests/grpo_worker.py MODEL_DIR OUT_DIR STEPS [RESUME]``: ``train_grpo`` from ``MODEL_DIR`` for STEPS
optimiser steps with a brightness reward (mean pixel / 255: continuous, so every group has a spread); rank 0
writes ``OUT_DIR/log.json`` (the logged metrics per step) beside the saved transformer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.training import make_accelerator
from soar.grpo_config import GrpoConfig
from soar.grpo_trainer import train_grpo
from soar.models.bundle import load_bundle

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle",
           "a photo of a black square"]


def brightness(images: np.ndarray, prompts, metadata) -> np.ndarray:
    return images.reshape(len(images), -1).mean(1) / 255.0


def config(steps: int, resume: str | None = None, **overrides) -> GrpoConfig:
    return GrpoConfig(**{"prompts_per_iteration": 2, "num_image_per_prompt": 4, "updates_per_iteration": 2,
                         "sample_batch_size": 3, "train_batch_size": 2, "num_steps": 3, "resolution": 16,
                         "learning_rate": 1e-3, "max_train_steps": steps, "checkpointing_steps": 2,
                         "checkpoints_total_limit": None, "snapshot_steps": 0, "validation_steps": 0,
                         "log_every": 1, "seed": 3, "ema_decay": 0.9, "beta": 0.04, "resume_from_checkpoint": resume,
                         **overrides})


def run(model_dir: str, out_dir: str, steps: int, resume: str | None = None) -> None:
    torch.manual_seed(0)
    accelerator = make_accelerator("no")
    logged: dict[int, dict[str, float]] = {}
    train_grpo(load_bundle(model_dir), PROMPTS, [{} for _ in PROMPTS], brightness, config(steps, resume), out_dir,
               accelerator, lambda metrics, step: logged.__setitem__(step, metrics))
    if accelerator.is_main_process:
        (Path(out_dir) / "log.json").write_text(json.dumps(logged))
    accelerator.end_training()


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
