"""Glue between the typed config, accelerate, MLflow and ``soar.trainer.train``."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from pipeline.config import Config
from pipeline.grids import captioned_grid
from pipeline.tracking import StageRun, interrupted_run, stage_run
from soar.checkpoint import resolve_resume
from soar.data.dataset import unusable_buckets
from soar.data.jsonl import read_clean_records
from soar.data.prepare import check_buckets
from soar.latent_cache import LatentCache, codec_key
from soar.models.bundle import SD3Bundle, load_bundle
from soar.models.geometry import check_side
from soar.progress import Progress
from soar.rollout import SoarConfig
from soar.text_cache import free_text_encoders, load_cache
from soar.train_config import TrainConfig
from soar.trainer import train

VALIDATION_DIR = "validation"  # MLflow artifact folder of the validation grids


def deepspeed_launch() -> bool:
    """Whether ``accelerate launch`` asked for DeepSpeed (a ``distributed_type: DEEPSPEED`` config such as
    pipeline/launch/zero2.yaml); raises one line saying what to do when DeepSpeed cannot run here.

    DeepSpeed runs on CUDA GPUs, or on the CPU (gloo) when ``DS_ACCELERATOR=cpu`` is set: without CUDA the
    CPU is never picked silently, so a GPU machine whose CUDA is broken does not train on its CPU.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return False
    if importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError("the launch config asks for DeepSpeed (distributed_type: DEEPSPEED) but deepspeed is not "
                           "installed: pip install -e '.[deepspeed]', or launch with a DDP config (multi_gpu.yaml, "
                           "cpu_multi.yaml)")
    if not torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        raise RuntimeError("the launch config asks for DeepSpeed but CUDA is not available: set DS_ACCELERATOR=cpu "
                           "to run DeepSpeed on the CPU (gloo backend), or launch with pipeline/launch/cpu_multi.yaml")
    return True


def make_accelerator(mixed_precision: str, gradient_accumulation_steps: int = 1) -> Accelerator:
    """The Accelerator the launch configuration asks for, with the section's precision and accumulation.

    DeepSpeed launches get DeepSpeed (the plugin accelerate builds from the config's JSON), on the GPUs or,
    with ``DS_ACCELERATOR=cpu``, on the CPU over gloo; other launches (DDP on GPUs, gloo on CPUs, one
    process) run on CUDA when there is one and on the CPU otherwise. ``Accelerator(cpu=True)`` would drop
    the DeepSpeed plugin, and without CUDA accelerate only counts the processes when it is told the backend.
    """
    kwargs = dict(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps)
    if not deepspeed_launch():
        return Accelerator(cpu=not torch.cuda.is_available(), **kwargs)
    if torch.cuda.is_available():
        return Accelerator(**kwargs)
    return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)


def validation_logger(run, stage: str, method: str, prompts: tuple[str, ...]):
    """Callback saving each step's validation images ``[N, H, W, 3]`` as one grid with ``prompts`` under them,
    ``validation/step_XXXXXX.png`` in MLflow."""
    def on_validation(images: np.ndarray, step: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"step_{step:06d}.png"
            captioned_grid(list(images), list(prompts), title=f"{stage}:{method} step {step}").save(path)
            run.log_artifact(path, VALIDATION_DIR)
        print(f"{stage}:{method} validation at step {step}: {len(images)} images -> {VALIDATION_DIR}/{path.name}",
              flush=True)

    return on_validation


@contextlib.contextmanager
def training_run(accelerator: Accelerator, mlflow_cfg, stage: str, method: str, params: dict, out_dir: str | Path,
                 resume_from_checkpoint: str | None, max_train_steps: int,
                 run: StageRun | None = None) -> Iterator[tuple[StageRun, Callable[[dict[str, float], int], None]]]:
    """The MLflow run ``{stage}:{method}`` a training logs into (``run`` when given; a resumed training continues
    its interrupted run) and the ``log(metrics, step)`` that writes each logged step to it and to the progress line."""
    out_tag = str(Path(out_dir).resolve())
    resuming = resolve_resume(resume_from_checkpoint, Path(out_dir) / "checkpoints") is not None
    continued = (interrupted_run(mlflow_cfg, f"{stage}:{method}", out_tag)
                 if resuming and run is None and accelerator.is_main_process else None)
    opened = (contextlib.nullcontext(run) if run is not None
              else stage_run(mlflow_cfg, stage, method, params, main_process=accelerator.is_main_process,
                             tags={"out_dir": out_tag}, continue_run_id=continued))
    with opened as run:
        # every logged step is shown (the section's log_every is the interval); rate and ETA count from the first
        # logged step, so neither the set-up nor the steps before a resume skew them
        progress = Progress(f"{stage}:{method}", max_train_steps, unit="step", start=None,
                            main=accelerator.is_main_process, every=0)

        def log(metrics: dict[str, float], step: int) -> None:
            run.log_metrics(metrics, step=step)
            progress.update(step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

        yield run, log


def run_training(bundle: SD3Bundle, t: TrainConfig, soar: SoarConfig | None, jsonl_path: str | Path,
                 image_dir: str | Path, out_dir: str | Path, *, stage: str, method: str, mlflow_cfg,
                 params: dict, dataloader_num_workers: int = 0, text_cache: str | Path | None = None,
                 model_dir: str | Path | None = None, latent_cache: str | Path | None = None,
                 run: StageRun | None = None, text_encoder_dtype: str = "float32",
                 image_memory_mib: int = 0) -> dict[str, float]:
    """Train and save ``bundle.transformer`` under ``out_dir``; logs to MLflow from rank 0.

    ``text_cache``: the embed stage's folder, checked against the text encoders of ``model_dir`` (the
    bundle's folder) and ``text_encoder_dtype`` (the dtype they ran in); the encoders are then dropped.
    None: captions are encoded once at the start.
    ``latent_cache``: folder of the VAE latent cache (keyed by ``model_dir``'s codec files); None: encode per step.
    ``run``: an open MLflow run to log into (the study's per-seed runs); None opens ``{stage}:{method}``.
    ``image_memory_mib``: decoded training images kept in memory (``data.image_memory_mib``).
    """
    accelerator = make_accelerator(t.mixed_precision, t.gradient_accumulation_steps)
    records = read_clean_records(jsonl_path)  # prepare is where lines get dropped
    # prepare checks this too; a JSONL written by hand must fail here, not in the first step's patchify
    section = "pretrain" if stage == "pretrain" else "train"  # where t comes from, for error messages
    multiple = bundle.codec.downscale * bundle.transformer.config.patch_size
    check_buckets(records, multiple, jsonl_path)
    if t.validation_enabled:
        check_side(t.validation_resolution, multiple, f"{section}.validation_resolution", model_dir or "the model")
    unused = unusable_buckets([r.bucket for r in records], t.train_batch_size, accelerator.num_processes,
                              f"{section}.train_batch_size")
    if unused and accelerator.is_main_process:  # drop_last batching never draws these
        print(f"{stage}:{method}: {sum(unused.values())} image(s) in buckets smaller than train_batch_size "
              f"{t.train_batch_size} are never trained on: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in
                                                                          unused.items()), flush=True)
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
                          joint_attention_dim=bundle.transformer.config.joint_attention_dim,
                          text_encoder_dtype=text_encoder_dtype)
        free_text_encoders(bundle)
    with training_run(accelerator, mlflow_cfg, stage, method, params, out_dir, t.resume_from_checkpoint,
                      t.max_train_steps, run) as (run, log):
        final = train(bundle, records, image_dir, t, soar, out_dir, accelerator, log, text=text,
                      on_validation=validation_logger(run, stage, method, t.validation_prompts), latents=latents,
                      dataloader_num_workers=dataloader_num_workers, image_memory_mib=image_memory_mib)
    accelerator.end_training()
    return final


def post_train(cfg: Config, method: str, out_dir: str | Path, *, stage: str = "train", params: dict | None = None,
               run: StageRun | None = None) -> dict[str, float]:
    """SFT (``method="sft"``) or SOAR (``"soar"``) of the base model on the prepared data: stage ``train@*`` and
    the study's runs. Reads the ``data``, ``model``, ``train``, ``soar`` (SOAR only) and ``mlflow`` sections."""
    if method not in ("sft", "soar"):
        raise ValueError(f"unknown method {method!r}; expected sft or soar")
    if method == "soar" and cfg.soar is None:
        raise ValueError("method soar needs the soar section (declare it in the stage's params)")
    deepspeed_launch()  # a DeepSpeed launch that cannot run stops here, before the model is read
    bundle = load_bundle(cfg.model.base_path, t5_max_length=cfg.model.t5_max_length,
                         text_encoders=cfg.data.text_cache is None,  # with a cache they are never needed
                         text_encoder_dtype=cfg.model.text_encoder_dtype)
    return run_training(bundle, cfg.train, cfg.soar if method == "soar" else None,
                        Path(cfg.data.prepared_dir) / "train.jsonl", cfg.data.image_dir, out_dir, stage=stage,
                        method=method, mlflow_cfg=cfg.mlflow, params=params or {},
                        dataloader_num_workers=cfg.data.dataloader_num_workers, text_cache=cfg.data.text_cache,
                        model_dir=cfg.model.base_path, latent_cache=cfg.data.latent_cache, run=run,
                        text_encoder_dtype=cfg.model.text_encoder_dtype,
                        image_memory_mib=cfg.data.image_memory_mib)
