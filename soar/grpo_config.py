"""The ``grpo`` section: ``GrpoConfig``, what ``soar.grpo_trainer.train_grpo`` takes.

Flow-GRPO (Liu et al., 2025) as its public code runs it, in this project's terms. One *iteration* samples
``prompts_per_iteration`` prompts, ``num_image_per_prompt`` images each (a group), with the SDE sampler,
recording every step's log-probability; scores them with the reward; turns the rewards into group-relative
advantages; then takes ``updates_per_iteration`` optimiser steps, each on an equal share of the images, over the
first ``int(num_steps * timestep_fraction)`` sampler steps of every trajectory. ``max_train_steps``,
``snapshot_steps`` and ``checkpointing_steps`` count optimiser steps, as in the ``train`` section.

The defaults are the tiny profile's (CPU, the tiny world's exact GenEval reward). Flow-GRPO's SD3.5-Medium
GenEval config (``config/grpo.py``, ``geneval_sd3``, on 32 GPUs) samples 48 prompts x 24 images per epoch in
10 steps at CFG 4.5 and noise level 0.7 and takes two optimiser steps per epoch (prompts_per_iteration 48,
num_image_per_prompt 24, updates_per_iteration 2), trains 9 of the 10 steps (timestep_fraction 0.99), clips the
ratio at 1e-4 and the advantages at 5, weighs the KL by beta 0.04, divides by the std of every reward
(global_std), keeps an EMA and trains LoRA adapters (rank 32, alpha 64) at lr 3e-4 (``config/base.py``);
``profiles/paper.yaml`` carries those values.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Literal

from soar.data.prompts import PromptFormat
from soar.finetune import LoraConfig
from soar.schema import at_least, check, positive
from soar.train_config import LoopConfig, ValidationConfig

INIT_FROM = ("base", "sft", "soar")


@dataclass(frozen=True)
class GrpoConfig(LoopConfig, LoraConfig, ValidationConfig):
    """The ``grpo`` section: GRPO's own keys below, plus the loop's, LoRA's and validation's it inherits."""

    init_from: Literal[INIT_FROM] = "base"  # starting weights: the base model, or train@sft's / train@soar's result
    prompts: str = "data/world/grpo/metadata.jsonl"  # training prompts: GenEval metadata JSONL or one per line
    prompt_format: PromptFormat = "geneval"  # how to read grpo.prompts
    reward: dict[str, float] = field(default_factory=lambda: types.MappingProxyType(
        {"geneval": 1.0}))  # scorer name -> weight: the reward is the weighted sum (scorers built as the score stage's)
    prompts_per_iteration: int = 8  # distinct prompts sampled per iteration, all processes together
    num_image_per_prompt: int = 8  # group size: images per prompt; advantages are relative within the group
    updates_per_iteration: int = 2  # optimiser steps per iteration, each on an equal share of its images
    sample_batch_size: int = 32  # images per sampling forward per process (CFG doubles the rows)
    train_batch_size: int = 16  # images per training forward per process
    num_steps: int = 10  # SDE sampler steps per trajectory (Flow-GRPO: 10 while training)
    guidance_scale: float = 4.5  # CFG scale while sampling and in the training forwards
    noise_level: float = 0.7  # eta of the SDE sampler; > 0 (the step's log-probability needs noise)
    resolution: int = 32  # side of the sampled images, pixels
    timestep_fraction: float = 0.99  # train on the first int(num_steps * fraction) steps of each trajectory
    clip_range: float = 1.0e-4  # PPO ratio clip: ratios outside 1 +- clip_range carry no gradient
    adv_clip_max: float = 5.0  # advantages clipped to +- this before the PPO objective
    beta: float = 0.04  # weight of the KL to the starting model (0: no KL term and no reference forward)
    global_std: bool = True  # divide by the std of all rewards of the iteration (false: each group's own std)
    # the loop's keys with other defaults than train's: the tiny world's GRPO, 20 iterations (~4.5 min on 2 cores)
    learning_rate: float = 3.0e-4  # AdamW learning rate (Flow-GRPO's; on the tiny base 1e-3 collapsed GenEval)
    max_train_steps: int = 40  # optimiser steps (updates_per_iteration per iteration)
    snapshot_steps: int = 10  # every N steps save the sampled weights (EMA, LoRA merged) to <out>/snapshots (0 = none)
    validation_steps: int = 20  # sample the validation prompts every this many optimiser steps, to MLflow (0 = off)

    def __post_init__(self) -> None:
        for base in (LoopConfig, LoraConfig, ValidationConfig):
            base.__post_init__(self)
        at_least(self, 1, "prompts_per_iteration", "updates_per_iteration", "sample_batch_size", "train_batch_size",
                 "num_steps", "resolution")
        check(self.num_image_per_prompt >= 2, "num_image_per_prompt", "must be >= 2 (a group needs a spread)")
        check(self.noise_level > 0, "noise_level", "must be > 0: with no noise the SDE step is the ODE step and its "
              "log-probability is undefined")
        check(0 < self.timestep_fraction <= 1 and self.train_steps >= 1, "timestep_fraction",
              f"must be in (0, 1] and leave int(num_steps * fraction) >= 1 steps (num_steps {self.num_steps})")
        positive(self, "clip_range", "adv_clip_max")
        at_least(self, 0, "beta", "guidance_scale")
        check(len(self.reward) > 0 and all(w != 0 for w in self.reward.values()), "reward",
              "must name at least one scorer, each with a nonzero weight")
        check(self.max_train_steps % self.updates_per_iteration == 0, "max_train_steps",
              f"must be a multiple of updates_per_iteration ({self.updates_per_iteration})")
        check(self.checkpointing_steps % self.updates_per_iteration == 0, "checkpointing_steps",
              f"must be a multiple of updates_per_iteration ({self.updates_per_iteration}): a checkpoint falls "
              "between iterations, where no sampled images are pending")
        images = self.prompts_per_iteration * self.num_image_per_prompt
        check(images % self.updates_per_iteration == 0, "updates_per_iteration",
              f"must divide the iteration's {images} images (prompts_per_iteration x num_image_per_prompt)")

    @property
    def train_steps(self) -> int:
        """Sampler steps trained per trajectory: the first int(num_steps * timestep_fraction)."""
        return int(self.num_steps * self.timestep_fraction)

    @property
    def images_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.num_image_per_prompt
