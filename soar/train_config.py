"""The ``train`` and ``pretrain`` sections: ``TrainConfig``, what ``soar.trainer.train`` takes.

A section's keys are declared by the component that reads them: the objective's in
``soar.flow.FlowMatchingConfig``, LoRA's in ``soar.finetune.LoraConfig``, validation's below (what
``soar.validation`` reads), the loop's in ``LoopConfig`` (shared with the ``grpo`` section) and the batch keys
in ``TrainConfig``, which inherits the others, so ``params.yaml`` keeps one flat ``train`` section. They sit in
this small module rather than in ``soar/trainer.py`` or ``soar/validation.py`` because every stage loads the
configuration: declared in the trainer, every stage would import (and depend in ``dvc.yaml`` on) the whole
training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from soar.finetune import OPTIMIZERS, LoraConfig
from soar.flow import FlowMatchingConfig
from soar.schema import at_least, check, positive


@dataclass(frozen=True)
class ValidationConfig:
    """The ``train.validation_*`` keys: fixed prompts sampled during training (``soar.validation``)."""

    validation_steps: int = 50  # sample the validation prompts every this many optimiser steps, to MLflow (0 = off)
    validation_prompts: list[str] = ("a photo of a red circle", 'a sign that says "CAT"')  # one image each
    validation_num_inference_steps: int = 8  # Euler steps per validation image
    validation_guidance_scale: float = 4.5  # CFG scale of the validation images
    validation_resolution: int = 32  # side of the validation images, pixels
    validation_seed: int = 7  # base seed; validation image i uses its own generator from (seed, i)

    def __post_init__(self) -> None:
        check(self.validation_steps >= 0, "validation_steps", "must be >= 0")
        at_least(self, 1, "validation_num_inference_steps", "validation_resolution")
        at_least(self, 0, "validation_guidance_scale", "validation_seed")

    @property
    def validation_enabled(self) -> bool:
        return self.validation_steps > 0 and len(self.validation_prompts) > 0

    def validation_due(self, step: int) -> bool:
        return self.validation_enabled and step % self.validation_steps == 0


@dataclass(frozen=True)
class LoopConfig:
    """The optimisation loop's keys, shared by ``TrainConfig`` (``train``, ``pretrain``) and
    ``soar.grpo_config.GrpoConfig`` (``grpo``): optimiser, LR schedule, length, checkpoints, snapshots, EMA, logging.

    Checkpoints go to ``<stage output>/checkpoints/checkpoint-{step}`` (full state, for resuming), snapshots to
    ``<stage output>/snapshots/step-{step:06d}/transformer`` (weights only). ``resume_from_checkpoint`` is for
    runs outside DVC or with ``persist: true`` outs: ``dvc repro`` deletes a stage's outputs, checkpoints
    included, before rerunning it.
    """

    seed: int = 42  # training seed (noise, timesteps, data order)
    learning_rate: float = 1.0e-4  # AdamW learning rate
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"  # LR schedule
    lr_warmup_steps: int = 0  # warm-up steps of the LR schedule
    adam_weight_decay: float = 1.0e-2  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    max_train_steps: int = 100  # optimiser steps
    checkpointing_steps: int = 0  # full-state checkpoint every this many optimiser steps (0 = none)
    checkpoints_total_limit: int | None = 2  # keep this many newest checkpoints, the oldest deleted (null = all)
    snapshot_steps: int = 25  # every N steps save the sampled weights (EMA, LoRA merged) to <out>/snapshots (0 = none)
    resume_from_checkpoint: str | None = None  # null = fresh; "latest" = newest under <out>/checkpoints; or a folder
    ema_decay: float | None = None  # EMA decay per optimiser step (e.g. 0.999), saved as transformer/; null = off
    optimizer: Literal[OPTIMIZERS] = "adamw"  # torch AdamW, or bitsandbytes 8-bit AdamW (extra "bnb")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast precision (no on CPU)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    log_every: int = 10  # log metrics every this many optimiser steps

    def __post_init__(self) -> None:
        for key in ("max_train_steps", "log_every"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.learning_rate > 0, "learning_rate", "must be > 0")
        positive(self, "max_grad_norm")  # clip_grad_norm_ with a negative norm flips the gradient
        at_least(self, 0, "lr_warmup_steps", "adam_weight_decay", "seed")
        check(self.checkpointing_steps >= 0, "checkpointing_steps", "must be >= 0")
        check(self.snapshot_steps >= 0, "snapshot_steps", "must be >= 0")
        check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, "checkpoints_total_limit",
              "must be null or >= 1")
        check(self.resume_from_checkpoint is None or self.resume_from_checkpoint.strip() != "",
              "resume_from_checkpoint", 'must be null, "latest" or a checkpoint folder')
        check(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "must be null or in (0, 1)")


@dataclass(frozen=True)
class TrainConfig(LoopConfig, FlowMatchingConfig, LoraConfig, ValidationConfig):
    """A ``train`` or ``pretrain`` section: the batch keys below, plus the loop's (``LoopConfig``), the objective's
    (``FlowMatchingConfig``), LoRA's (``LoraConfig``) and validation's (``ValidationConfig``) keys it inherits."""

    train_batch_size: int = 8  # images per process per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimiser step

    def __post_init__(self) -> None:
        for base in (LoopConfig, FlowMatchingConfig, LoraConfig, ValidationConfig):
            base.__post_init__(self)
        for key in ("train_batch_size", "gradient_accumulation_steps"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
