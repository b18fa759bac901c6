"""Glue between the typed config, accelerate, MLflow and ``soar.trainer.train``."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from pipeline.config import SoarConfig, TrainConfig
from pipeline.tracking import StageRun, stage_run
from soar.data.jsonl import read_clean_records
from soar.finetune import LoraSettings
from soar.latent_cache import LatentCache, codec_key
from soar.models.bundle import SD3Bundle
from soar.step import StepSettings
from soar.text_cache import free_text_encoders, load_cache
from soar.trainer import LoopSettings, train
from soar.validation import ValidationSettings, image_grid

VALIDATION_DIR = "validation"  # MLflow artifact folder of the validation grids


def step_settings(t: TrainConfig, soar: SoarConfig | None) -> StepSettings:
    """The step's knobs; without a ``soar`` section the step is SFT (lambda_aux = 0, no aux points)."""
    common = dict(weighting_scheme=t.weighting_scheme, logit_mean=t.logit_mean, logit_std=t.logit_std,
                  mode_scale=t.mode_scale, cond_dropout_rate=t.cond_dropout_rate)
    if soar is None:
        return StepSettings(lambda_aux=0.0, num_rollout_paths=1, trajectory_length=0, num_sampling_steps=1,
                            sde_rollout_type="flow_sde", sde_noise_scale=0.0, cfg_scale_sampling=1.0,
                            sigma_upper_ratio=None, aux_microbatch=None, sigma_sampling="grid", **common)
    return StepSettings(lambda_aux=soar.lambda_aux, num_rollout_paths=soar.num_rollout_paths,
                        trajectory_length=soar.trajectory_length, num_sampling_steps=soar.num_sampling_steps,
                        sde_rollout_type=soar.sde_rollout_type, sde_noise_scale=soar.sde_noise_scale,
                        cfg_scale_sampling=soar.cfg_scale_sampling, sigma_upper_ratio=soar.sigma_upper_ratio,
                        aux_microbatch=soar.aux_microbatch, sigma_sampling=soar.sigma_sampling, **common)


def loop_settings(t: TrainConfig, dataloader_num_workers: int) -> LoopSettings:
    """Optimiser/loop settings from a ``train`` or ``pretrain`` section."""
    return LoopSettings(
        seed=t.seed, learning_rate=t.learning_rate, lr_scheduler=t.lr_scheduler, lr_warmup_steps=t.lr_warmup_steps,
        adam_weight_decay=t.adam_weight_decay, max_grad_norm=t.max_grad_norm, train_batch_size=t.train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_train_steps=t.max_train_steps,
        checkpointing_steps=t.checkpointing_steps, gradient_checkpointing=t.gradient_checkpointing,
        dataloader_num_workers=dataloader_num_workers, log_every=t.log_every,
        checkpoints_total_limit=t.checkpoints_total_limit, resume_from_checkpoint=t.resume_from_checkpoint,
        ema_decay=t.ema_decay, optimizer=t.optimizer, snapshot_steps=t.snapshot_steps,
        lora=None if t.lora_rank is None else LoraSettings(t.lora_rank, t.lora_alpha, tuple(t.lora_target_modules)))


def validation_settings(t: TrainConfig) -> ValidationSettings:
    """The ``validation_*`` keys of a ``train`` or ``pretrain`` section."""
    return ValidationSettings(every=t.validation_steps, prompts=tuple(t.validation_prompts),
                              steps=t.validation_num_inference_steps, guidance_scale=t.validation_guidance_scale,
                              resolution=t.validation_resolution, seed=t.validation_seed)


def validation_logger(run, stage: str, method: str):
    """Callback saving each step's validation images as one grid, ``validation/step_XXXXXX.png`` in MLflow."""
    def on_validation(images: np.ndarray, step: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"step_{step:06d}.png"
            Image.fromarray(image_grid(images)).save(path)
            run.log_artifact(path, VALIDATION_DIR)
        print(f"{stage}:{method} validation at step {step}: {len(images)} images -> {VALIDATION_DIR}/{path.name}",
              flush=True)

    return on_validation


def run_training(bundle: SD3Bundle, t: TrainConfig, soar: SoarConfig | None, jsonl_path: str | Path,
                 image_dir: str | Path, out_dir: str | Path, *, stage: str, method: str, mlflow_cfg,
                 params: dict, dataloader_num_workers: int = 0, text_cache: str | Path | None = None,
                 model_dir: str | Path | None = None, latent_cache: str | Path | None = None,
                 run: StageRun | None = None) -> dict[str, float]:
    """Train and save ``bundle.transformer`` under ``out_dir``; logs to MLflow from rank 0.

    ``text_cache``: the embed stage's file, checked against the text encoders of ``model_dir`` (the
    bundle's folder); the encoders are then dropped. None: captions are encoded once at the start.
    ``latent_cache``: folder of the VAE latent cache (keyed by ``model_dir``'s codec files); None: encode per step.
    ``run``: an open MLflow run to log into (the study's per-seed runs); None opens ``{stage}:{method}``.
    """
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=t.mixed_precision,
                              gradient_accumulation_steps=t.gradient_accumulation_steps)
    records = read_clean_records(jsonl_path)  # prepare is where lines get dropped
    text = None
    latents = None
    if latent_cache is not None:
        if model_dir is None:
            raise ValueError("run_training: latent_cache needs model_dir (the folder whose codec encodes it)")
        latents = LatentCache(latent_cache, codec_key(model_dir))
    if text_cache is not None:
        if model_dir is None:
            raise ValueError("run_training: text_cache needs model_dir (the folder whose encoders built it)")
        text = load_cache(text_cache, model_dir, t5_max_length=bundle.t5_max_length,
                          joint_attention_dim=bundle.transformer.config.joint_attention_dim)
        free_text_encoders(bundle)
    opened = (contextlib.nullcontext(run) if run is not None
              else stage_run(mlflow_cfg, stage, method, params, main_process=accelerator.is_main_process))
    with opened as run:
        def log(metrics: dict[str, float], step: int) -> None:
            run.log_metrics(metrics, step=step)
            if accelerator.is_main_process:
                shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                print(f"{stage}:{method} step {step}/{t.max_train_steps} {shown}", flush=True)

        final = train(bundle, records, image_dir, loop_settings(t, dataloader_num_workers), step_settings(t, soar),
                      out_dir, accelerator, log, text=text, validation=validation_settings(t),
                      on_validation=validation_logger(run, stage, method), latents=latents)
        run.log_metrics({f"final/{k}": v for k, v in final.items()})
    accelerator.end_training()
    return final
