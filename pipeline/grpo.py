"""Glue for stage ``train@grpo``: the starting weights, the prompts, the reward from the scorer registry, MLflow."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.evaluation import build_scorers
from pipeline.tracking import StageRun
from pipeline.training import deepspeed_launch, make_accelerator, training_run, validation_logger
from soar.data.prompts import read_prompt_set
from soar.grpo_trainer import RewardFn, train_grpo
from soar.models.bundle import load_bundle
from soar.models.geometry import check_side
from soar.rewards import Scorer, available


def weighted_reward(scorers: Mapping[str, Scorer], weights: Mapping[str, float]) -> RewardFn:
    """The reward ``sum_name weight * score``, each scorer applied once to the whole batch."""
    def reward(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> np.ndarray:
        total = np.zeros(len(images), dtype=np.float64)
        for name, weight in weights.items():
            total += weight * np.array([r.score for r in scorers[name].score(images, prompts, metadata)])
        return total

    return reward


def start_weights(cfg: Config) -> Path:
    """The transformer folder GRPO starts from (``grpo.init_from``): the base model's or a post-trained one."""
    if cfg.grpo.init_from == "base":
        return Path(cfg.model.base_path) / "transformer"
    path = Path(cfg.model.models_dir) / cfg.grpo.init_from / "transformer"
    if not path.is_dir():
        raise FileNotFoundError(f"grpo.init_from is {cfg.grpo.init_from!r} but {path} does not exist: run "
                                f"train@{cfg.grpo.init_from} first (dvc repro train@{cfg.grpo.init_from})")
    return path


def run_grpo(cfg: Config, out_dir: str | Path, *, stage: str = "train", params: dict | None = None,
             run: StageRun | None = None) -> dict[str, float]:
    """Flow-GRPO from ``grpo.init_from`` on ``grpo.prompts`` with the ``grpo.reward`` mix; reads the ``model``,
    ``grpo``, ``score`` and ``mlflow`` sections. ``run``: an open MLflow run to log into (the study's per-seed
    runs); None opens ``{stage}:grpo``."""
    g = cfg.grpo
    if deepspeed_launch():
        raise RuntimeError("train@grpo runs under DDP or on one process; launch it with a DDP config "
                           "(multi_gpu.yaml, cpu_multi.yaml), not DeepSpeed")
    unknown = sorted(set(g.reward) - set(available()))
    if unknown:
        raise ValueError(f"params.yaml grpo.reward: unknown scorer {unknown[0]!r}; known: {', '.join(available())}")
    items = read_prompt_set(g.prompts, g.prompt_format)
    weights = start_weights(cfg)
    bundle = load_bundle(cfg.model.base_path, transformer_path=weights, t5_max_length=cfg.model.t5_max_length,
                         text_encoder_dtype=cfg.model.text_encoder_dtype)
    check_side(g.resolution, bundle.codec.downscale * bundle.transformer.config.patch_size, "grpo.resolution",
               cfg.model.base_path)
    reward = weighted_reward(build_scorers(cfg.score, list(g.reward)), g.reward)
    accelerator = make_accelerator(g.mixed_precision)
    with training_run(accelerator, cfg.mlflow, stage, "grpo", params or {}, out_dir, g.resume_from_checkpoint,
                      g.max_train_steps, run) as (run, log):
        if accelerator.is_main_process:
            run.log_metrics({"prompts": len(items)}, step=0)
        final = train_grpo(bundle, [i.prompt for i in items], [i.metadata for i in items], reward, g, out_dir,
                           accelerator, log, on_validation=validation_logger(run, stage, "grpo",
                                                                             g.validation_prompts))
    accelerator.end_training()
    return final
