"""The one typed configuration: ``params.yaml`` -> frozen dataclasses.

``params.yaml`` is read as YAML 1.2 (ruamel.yaml, like DVC, which rewrites it for
``dvc exp run -S``): ``no`` is the string "no" and ``1e-4`` a number.

Every field has no default here: ``params.yaml`` is the single source of values (its defaults
are the embedded tiny profile). ``load_config(path, sections)`` validates the whole file but
returns only the sections a stage declares, so a stage that reads a section it did not declare
in ``dvc.yaml`` fails at once instead of silently escaping DVC's change tracking.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ruamel.yaml import YAML

from pipeline.schema import ConfigError, build, require

WeightingScheme = Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"]
# The names of pipeline/prompt_files.py's FILES table (tests/test_prompt_files.py keeps the two equal); listed,
# not imported, so that every stage loading this config does not depend on the fetching code.
PromptFileName = Literal["flowgrpo/geneval/test_metadata.jsonl", "flowgrpo/ocr/test.txt",
                            "flowgrpo/drawbench/test.txt", "flowgrpo/pickscore/test.txt",
                            "geneval/evaluation_metadata.jsonl", "geneval/object_names.txt"]


@dataclass(frozen=True)
class SynthConfig:
    out_dir: str  # folder the tiny world is written to (train.jsonl, images/, eval/)
    num_images: int  # training images generated
    image_size: int  # side of the square images, pixels
    degraded_fraction: float  # fraction of training images blurred/noised (prepare must drop them)
    text_fraction: float  # fraction of training images showing a rendered word
    num_eval_geneval: int  # prompts in the tiny GenEval-format evaluation set
    num_eval_ocr: int  # prompts in the tiny OCR evaluation set
    num_heldout: int  # clean captioned images never trained on (eval/heldout/): the exposure-bias meter's data
    seed: int  # generator seed; same seed, same bytes

    def validate(self, where: str) -> None:
        require(self.num_images > 0, where, "num_images", "must be > 0")
        require(0 <= self.degraded_fraction < 1, where, "degraded_fraction", "must be in [0, 1)")
        require(0 <= self.text_fraction < 1, where, "text_fraction", "must be in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    jsonl_path: str  # training JSONL, one {"md5", "caption_en", "bw", "bh"} per line
    image_dir: str  # folder holding the images as {md5}.jpg
    quality: Literal["tiny_sharpness", "aesthetic"]  # prepare's filter score: tiny-world sharpness or LAION aesthetic
    quality_threshold: float  # keep images whose quality score is >= this
    prepared_dir: str  # output of prepare: filtered train.jsonl and report.json
    dataloader_num_workers: int  # DataLoader worker processes (0 = in the main process)
    text_cache: str | None  # text-embedding cache the embed stage writes and train@* read; null = encode per run
    text_cache_dtype: Literal["float32", "bfloat16", "float16"]  # storage dtype of the cached embeddings
    latent_cache: str | None  # folder of per-image VAE posterior moments, filled once by train@* (null = per step)


@dataclass(frozen=True)
class TinyModelConfig:
    sample_size: int  # latent side; with the pixel codec equal to the image side, pixels
    patch_size: int  # transformer patch side, latent pixels
    num_layers: int  # MMDiT blocks
    num_attention_heads: int  # attention heads per block
    attention_head_dim: int  # width of one head
    joint_attention_dim: int  # width of the text tokens fed to the transformer
    pooled_projection_dim: int  # width of the pooled text embedding (sum of both CLIP projections)
    caption_projection_dim: int  # transformer width (= heads x head_dim in SD3)
    qk_norm: str | None  # "rms_norm" as in SD3.5, or null
    text_hidden_size: int  # width of each tiny CLIP text encoder
    text_layers: int  # layers of each tiny CLIP text encoder
    text_max_length: int  # tokens per prompt for the CLIP tokenizers
    shift: float  # FlowMatchEulerDiscreteScheduler shift (3.0 for SD3.5)

    def validate(self, where: str) -> None:
        require(self.sample_size % self.patch_size == 0, where, "sample_size", "must divide by patch_size")
        require(
            self.caption_projection_dim == self.num_attention_heads * self.attention_head_dim,
            where, "caption_projection_dim", "must equal num_attention_heads * attention_head_dim",
        )
        require(self.pooled_projection_dim == 2 * self.text_hidden_size, where, "pooled_projection_dim",
                "must be 2 * text_hidden_size (two CLIP encoders)")


@dataclass(frozen=True)
class ModelConfig:
    base_path: str  # diffusers folder of the base model that SFT/SOAR start from and sampling opens
    pretrain_dir: str  # where the pretrain stage writes the tiny base model (tiny profile: = base_path)
    models_dir: str  # post-trained transformers go to {models_dir}/{method}/transformer
    t5_max_length: int  # T5 tokens per prompt when the folder has a T5 encoder (77 in the paper)
    tiny: TinyModelConfig  # architecture the pretrain stage builds from scratch


@dataclass(frozen=True)
class TrainConfig:
    """A ``train`` or ``pretrain`` section. Checkpoints go to ``<stage output>/checkpoints/checkpoint-{step}``
    (full state, for resuming), snapshots to ``<stage output>/snapshots/step-{step:06d}/transformer`` (weights only);
    ``resume_from_checkpoint`` is for runs outside DVC or with ``persist: true`` outs, since ``dvc repro``
    deletes a stage's outputs (checkpoints included) before rerunning it."""

    seed: int  # training seed (noise, timesteps, data order)
    learning_rate: float  # AdamW learning rate
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"]  # LR schedule
    lr_warmup_steps: int  # warm-up steps of the LR schedule
    adam_weight_decay: float  # AdamW decoupled weight decay
    max_grad_norm: float  # gradient clipping norm
    train_batch_size: int  # images per process per micro-step
    gradient_accumulation_steps: int  # micro-steps per optimiser step
    max_train_steps: int  # optimiser steps
    checkpointing_steps: int  # full-state checkpoint every this many optimiser steps (0 = none)
    checkpoints_total_limit: int | None  # keep this many newest checkpoints, the oldest deleted (null = all)
    snapshot_steps: int  # every N steps save the sampled weights (EMA, LoRA merged) to <out>/snapshots (0 = none)
    resume_from_checkpoint: str | None  # null = fresh; "latest" = newest under <out>/checkpoints; or a folder
    ema_decay: float | None  # EMA of the weights per optimiser step (e.g. 0.999), saved as transformer/; null = off
    optimizer: Literal["adamw", "adamw_8bit"]  # torch AdamW, or bitsandbytes 8-bit AdamW (extra "bnb")
    lora_rank: int | None  # null = full fine-tuning; r = train peft LoRA adapters of rank r (saved merged)
    lora_alpha: float  # LoRA scale numerator: update = (lora_alpha / lora_rank) * B @ A
    lora_target_modules: list[str]  # names of the linear layers LoRA wraps (SD3 attention projections)
    weighting_scheme: WeightingScheme  # timestep density and loss weight, as in SD3 training
    logit_mean: float  # mean of the logit-normal timestep density
    logit_std: float  # std of the logit-normal timestep density
    mode_scale: float  # scale of the "mode" timestep density (1.29 in SD3)
    mixed_precision: Literal["no", "fp16", "bf16"]  # autocast precision (no on CPU)
    gradient_checkpointing: bool  # recompute activations in backward to save memory
    cond_dropout_rate: float  # per-sample probability of training on the empty prompt
    log_every: int  # log metrics every this many optimiser steps
    validation_steps: int  # sample the validation prompts every this many optimiser steps, to MLflow (0 = off)
    validation_prompts: list[str]  # fixed validation prompts, one image each (grid validation/step_XXXXXX.png)
    validation_num_inference_steps: int  # Euler steps per validation image
    validation_guidance_scale: float  # CFG scale of the validation images
    validation_resolution: int  # side of the validation images, pixels
    validation_seed: int  # base seed; validation image i uses its own generator from (seed, i)

    def validate(self, where: str) -> None:
        for key in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "log_every",
                    "validation_num_inference_steps", "validation_resolution"):
            require(getattr(self, key) >= 1, where, key, "must be >= 1")
        require(self.validation_steps >= 0, where, "validation_steps", "must be >= 0")
        require(self.learning_rate > 0, where, "learning_rate", "must be > 0")
        require(0 <= self.cond_dropout_rate < 1, where, "cond_dropout_rate", "must be in [0, 1)")
        require(self.checkpointing_steps >= 0, where, "checkpointing_steps", "must be >= 0")
        require(self.snapshot_steps >= 0, where, "snapshot_steps", "must be >= 0")
        require(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, where,
                "checkpoints_total_limit", "must be null or >= 1")
        require(self.resume_from_checkpoint is None or self.resume_from_checkpoint.strip() != "", where,
                "resume_from_checkpoint", 'must be null, "latest" or a checkpoint folder')
        require(self.ema_decay is None or 0 < self.ema_decay < 1, where, "ema_decay", "must be null or in (0, 1)")
        require(self.lora_rank is None or self.lora_rank >= 1, where, "lora_rank", "must be null or >= 1")
        require(self.lora_rank is None or len(self.lora_target_modules) > 0, where, "lora_target_modules",
                "must name at least one module when lora_rank is set")


@dataclass(frozen=True)
class SoarConfig:
    lambda_aux: float  # weight of the auxiliary (self-correction) loss; 0 = SFT
    num_rollout_paths: int  # M: one ODE path plus M - 1 stochastic paths
    trajectory_length: int  # auxiliary points per rollout path (T)
    num_sampling_steps: int  # sampler steps the rollout step size is taken from (1/N in t)
    sde_rollout_type: Literal["simple", "sde", "flow_sde", "cps"]  # stochastic path formula
    sde_noise_scale: float  # noise scale eta of the stochastic paths
    cfg_scale_sampling: float  # CFG scale of the rollout velocity
    sigma_upper_ratio: float | None  # null: sigma' ~ U[sigma1, 1] (paper); r: U[sigma1, min(r*sigma0, 1)]
    aux_microbatch: int | None  # split main+aux forward into chunks of this many points (null = one)
    sigma_sampling: Literal["grid", "continuous"]  # main/rollout sigmas: scheduler grid (paper) or shift(u)

    def validate(self, where: str) -> None:
        require(self.lambda_aux >= 0, where, "lambda_aux", "must be >= 0")
        require(self.num_rollout_paths >= 1, where, "num_rollout_paths", "must be >= 1")
        require(self.trajectory_length >= 0, where, "trajectory_length", "must be >= 0")
        require(self.num_sampling_steps >= 1, where, "num_sampling_steps", "must be >= 1")
        require(self.sde_noise_scale >= 0, where, "sde_noise_scale", "must be >= 0")
        require(self.sigma_upper_ratio is None or self.sigma_upper_ratio >= 1, where, "sigma_upper_ratio",
                "must be null or >= 1 (below 1, r*sigma0 can fall under sigma1 and the range would be empty)")
        require(self.aux_microbatch is None or self.aux_microbatch >= 1, where, "aux_microbatch",
                "must be null or >= 1")


@dataclass(frozen=True)
class PromptFilesConfig:
    out_dir: str  # folder the public prompt files are written to, each under its name (+ manifest.json)
    files: list[PromptFileName]  # which of pipeline/prompt_files.py's files to obtain ([] = none, manifest only)
    source: str | None  # null = their public GitHub addresses; else a mirror folder or http(s)/file URL base

    def validate(self, where: str) -> None:
        require(self.out_dir.strip() != "", where, "out_dir", "must not be empty")
        require(len(set(self.files)) == len(self.files), where, "files", "names a file twice")
        require(self.source is None or self.source.strip() != "", where, "source", "must be null or non-empty")


@dataclass(frozen=True)
class PromptSetConfig:
    path: str  # prompt file: GenEval metadata JSONL or one prompt per line
    format: Literal["geneval", "text"]  # how to read the file
    images_per_prompt: int  # images sampled per prompt line


@dataclass(frozen=True)
class SampleConfig:
    out_dir: str  # samples go to {out_dir}/{model}/{prompt set}/
    num_inference_steps: int  # Euler steps of the sampler (40 in the paper)
    guidance_scale: float  # CFG scale (4.5 in the paper)
    resolution: int  # image side, pixels (512 in the paper)
    batch_size: int  # images per forward (CFG doubles it)
    seed: int  # base seed; image (prompt i, image j) uses its own generator from (seed, i, j)
    prompt_sets: dict[str, PromptSetConfig]  # named evaluation prompt sets
    grid_prompts: int  # prompts per set shown side by side in the report grid


@dataclass(frozen=True)
class ScoreCheckpoints:
    """Local weights of the learned scorers (null = not here; a scorer that needs one stops naming its key)."""

    clip_vit_l14: str | None  # folder of openai/clip-vit-large-patch14 (ClipScore, Aesthetic, GenEval colours)
    pickscore: str | None  # folder of yuvalkirstain/PickScore_v1 (a CLIPModel)
    pickscore_processor: str | None  # folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's processor)
    aesthetic_mlp: str | None  # file sac+logos+ava1-l14-linearMSE.pth (LAION improved aesthetic predictor)
    hpsv21: str | None  # file HPS_v2.1_compressed.pt (open_clip ViT-H-14 weights)
    image_reward: str | None  # file ImageReward.pt (ImageReward-v1.0)
    image_reward_tokenizer: str | None  # folder of the bert-base-uncased tokenizer ImageReward's BLIP uses
    mask2former: str | None  # folder of facebook/mask2former-swin-small-coco-instance (GenEval detector)


@dataclass(frozen=True)
class ScoreConfig:
    out_dir: str  # per-image scores and metrics go to {out_dir}/{model}/
    scorers: dict[str, list[str]]  # prompt set -> names of the scorers applied to it
    geneval_backend: Literal["tiny", "mask2former"]  # detector: exact tiny-world one or Mask2Former
    ocr_engine: Literal["rapidocr", "paddle"]  # PP-OCRv4 through rapidocr-onnxruntime, or PaddleOCR (extra)
    ocr_upscale: int  # OCR input side: smaller images are upscaled to this, pixels
    batch_size: int  # images per scorer call
    device: str  # torch device of the learned scorers; "auto" = cuda when available, else cpu
    allow_download: bool  # fetch weights whose path is null from their hub ids (false: missing = error)
    checkpoints: ScoreCheckpoints  # local weights of the learned scorers


@dataclass(frozen=True)
class DynamicsConfig:
    """Training dynamics: each ``train.snapshot_steps`` snapshot of SFT and SOAR sampled and scored like the
    final models (``sample`` and ``score`` settings), giving reward-vs-step curves."""

    out_dir: str  # samples to {out_dir}/{method}/step-{N:06d}/{set}/, curves to {out_dir}/{method}.csv
    max_prompts_per_set: int | None  # prompts per set, evenly spaced in file order (every k-th); null = all

    def validate(self, where: str) -> None:
        require(self.out_dir.strip() != "", where, "out_dir", "must not be empty")
        require(self.max_prompts_per_set is None or self.max_prompts_per_set >= 1, where, "max_prompts_per_set",
                "must be null or >= 1")


@dataclass(frozen=True)
class StudyConfig:
    """The multi-seed study (``dvc repro study/dvc.yaml``, pipeline/study.py): SFT and SOAR trained from the
    same base and data with several seeds, a lambda_aux x trajectory_length sweep, each evaluated like
    the sample/score stages plus the exposure-bias meter (soar/exposure.py) on held-out images."""

    out_dir: str  # per-run models and metrics: {out_dir}/runs/{run}/; tables: {out_dir}/report/
    seeds: list[int]  # train.seed of the SFT and SOAR runs (>= 2 for an interval; 3 by default)
    lambda_aux: list[float]  # sweep values of soar.lambda_aux (run with seeds[0])
    trajectory_length: list[int]  # sweep values of soar.trajectory_length (run with seeds[0])
    sampling_steps: list[int]  # Euler steps at which base and seed runs are also scored (final metric vs steps)
    heldout_jsonl: str  # held-out captioned images ({"md5", "caption_en", "bw", "bh"} lines) for the meter
    heldout_image_dir: str  # folder of the held-out images ({md5}.jpg)
    heldout_images: int | None  # first N held-out images used by the meter; null = all
    drift_starts: list[int]  # indices into the sampler's sigmas (sample.num_inference_steps) where meter rollouts start
    drift_max_k: int  # sampler steps per meter rollout (k = 1..drift_max_k)
    drift_seed: int  # seed of the meter's noise z1 (the same noise for every model)
    confidence: float  # level of the SOAR - SFT interval (Welch), e.g. 0.95
    experiment: str  # MLflow experiment of the study's runs (one parent run per configuration, seeds nested)

    def validate(self, where: str) -> None:
        require(len(self.seeds) >= 2 and len(set(self.seeds)) == len(self.seeds), where, "seeds",
                "needs >= 2 distinct seeds")
        require(all(v > 0 for v in self.lambda_aux), where, "lambda_aux", "values must be > 0")
        require(all(v >= 1 for v in self.trajectory_length), where, "trajectory_length", "values must be >= 1")
        require(len(self.sampling_steps) > 0 and all(v >= 1 for v in self.sampling_steps), where, "sampling_steps",
                "needs values >= 1")
        require(len(self.drift_starts) > 0 and all(v >= 0 for v in self.drift_starts), where, "drift_starts",
                "needs indices >= 0")
        require(self.drift_max_k >= 1, where, "drift_max_k", "must be >= 1")
        require(self.heldout_images is None or self.heldout_images >= 1, where, "heldout_images",
                "must be null or >= 1")
        require(0 < self.confidence < 1, where, "confidence", "must be in (0, 1)")


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str  # MLflow experiment name
    tracking_uri: str | None  # null: $MLFLOW_TRACKING_URI or sqlite mlflow.db at the repo root
    log_images: bool  # log sample images and the grid as artifacts


@dataclass(frozen=True)
class LaunchConfig:
    num_processes: int  # processes per machine for accelerate launch
    num_machines: int  # machines for accelerate launch
    config_file: str  # accelerate config file


@dataclass(frozen=True)
class Config:
    synth: SynthConfig | None = None
    data: DataConfig | None = None
    model: ModelConfig | None = None
    pretrain: TrainConfig | None = None
    train: TrainConfig | None = None
    soar: SoarConfig | None = None
    prompt_files: PromptFilesConfig | None = None
    sample: SampleConfig | None = None
    score: ScoreConfig | None = None
    dynamics: DynamicsConfig | None = None
    study: StudyConfig | None = None
    mlflow: MlflowConfig | None = None
    launch: LaunchConfig | None = None


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def parse_config(raw: dict, source: str = "params.yaml") -> Config:
    """Validate a whole params mapping; every section is required."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    missing = [s for s in SECTIONS if s not in raw]
    if missing:
        raise ConfigError(f"{source}: missing section {missing[0]!r}")
    return build(Config, raw, source)


def read_params(path: str | Path) -> dict:
    """The raw mapping in ``path``, read as YAML 1.2 (as DVC reads and writes params.yaml)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameters file not found: {path}")
    with path.open() as f:
        return YAML(typ="safe", pure=True).load(f)


def load_config(path: str | Path = "params.yaml", sections: tuple[str, ...] | None = None) -> Config:
    """Load ``path``; keep only ``sections`` (all when None), the rest read as None."""
    path = Path(path)
    cfg = parse_config(read_params(path), str(path))
    if sections is None:
        return cfg
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} requested (known: {', '.join(SECTIONS)})")
    return dataclasses.replace(cfg, **{s: None for s in SECTIONS if s not in sections})
