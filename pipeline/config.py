"""The one typed configuration: ``params.yaml`` -> frozen dataclasses, composed here.

Each section is one frozen dataclass whose fields carry the default (the embedded tiny profile)
and a one-line comment with meaning and units; range checks sit in its ``__post_init__``. A
section that a library function takes as an argument is declared beside that function in
``soar/`` (``soar.train_config.TrainConfig`` for ``train`` and ``pretrain``, ``soar.rollout.SoarConfig``
for ``soar``, ``soar.models.tiny.TinyModelConfig`` for ``model.tiny``); the pipeline's own
sections are declared below, because every stage imports this module and a section declared in a
stage's module would make every stage depend (in DVC) on every other stage's code.

``params.yaml`` is read as YAML 1.2 (ruamel.yaml, like DVC, which rewrites it for
``dvc exp run -S``): ``no`` is the string "no" and ``1e-4`` a number. Unknown keys and wrong types
are errors naming the dotted key; an absent key keeps its default. ``params.yaml`` itself is
written by ``python -m pipeline.profile`` from these defaults and a profile's overlay, so it lists
every key with its comment. ``load_config(path, sections)`` validates the whole file but returns
only the sections a stage declares, so a stage that reads a section it did not declare in
``dvc.yaml`` fails at once instead of silently escaping DVC's change tracking.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ruamel.yaml import YAML

from pipeline.reference_config import ReferenceConfig, check_reference_names
from soar.data.prompts import PromptFormat
from soar.grpo_config import GrpoConfig
from soar.models.tiny import TinyModelConfig
from soar.rollout import SoarConfig
from soar.schema import ConfigError, at_least, build, check
from soar.train_config import TrainConfig

# The names of pipeline/prompt_files.py's FILES table (tests/test_prompt_files.py keeps the two equal); listed,
# not imported, so that every stage loading this config does not depend on the fetching code.
PromptFileName = Literal["flowgrpo/geneval/test_metadata.jsonl", "flowgrpo/ocr/test.txt",
                         "flowgrpo/drawbench/test.txt", "flowgrpo/pickscore/test.txt",
                         "geneval/evaluation_metadata.jsonl", "geneval/object_names.txt"]


@dataclass(frozen=True)
class SynthConfig:
    """The tiny world (stage synth; tiny profile only): training images with captions and evaluation sets."""

    out_dir: str = "data/world"  # folder the tiny world is written to (train.jsonl, images/, eval/)
    num_images: int = 3000  # training images generated
    image_size: int = 32  # side of the square images, pixels
    degraded_fraction: float = 0.1  # fraction of training images blurred/noised (prepare must drop them)
    text_fraction: float = 0.3  # fraction of training images showing a rendered word
    num_eval_geneval: int = 192  # prompts in the tiny GenEval-format set (32 per tag: one prompt moves it 1/192)
    num_eval_ocr: int = 48  # prompts in the tiny OCR evaluation set
    num_heldout: int = 64  # clean captioned images never trained on (eval/heldout/): the exposure-bias meter's data
    num_grpo_prompts: int = 192  # GenEval-format training prompts of train@grpo (grpo/metadata.jsonl)
    seed: int = 0  # generator seed; same seed, same bytes

    def __post_init__(self) -> None:
        check(self.num_images > 0, "num_images", "must be > 0")
        at_least(self, 1, "image_size")
        at_least(self, 0, "num_eval_geneval", "num_eval_ocr", "num_heldout", "num_grpo_prompts", "seed")
        check(0 <= self.degraded_fraction < 1, "degraded_fraction", "must be in [0, 1)")
        check(0 <= self.text_fraction < 1, "text_fraction", "must be in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    """Training data: the JSONL and images, prepare's quality filter, and the text and latent caches."""

    jsonl_path: str = "data/world/train.jsonl"  # training JSONL, one {"md5", "caption_en", "bw", "bh"} per line
    image_dir: str = "data/world/images"  # folder holding the images as {md5}.jpg
    quality: Literal["tiny_sharpness", "aesthetic"] = "tiny_sharpness"  # prepare's filter: tiny sharpness or LAION
    quality_threshold: float = 5.0  # keep images whose quality score is >= this
    prepared_dir: str = "data/prepared"  # output of prepare: filtered train.jsonl and report.json
    dataloader_num_workers: int = 0  # DataLoader worker processes (0 = in the main process)
    image_memory_mib: int = 1024  # decoded training images kept in memory, MiB per loader process (0 = none)
    text_cache: str | None = "data/cache/text_embeddings"  # embed stage's text-embedding folder; null = per run
    text_cache_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage dtype of the cached embeddings
    latent_cache: str | None = None  # folder of per-image VAE posterior moments filled by train@* (null = per step)

    def __post_init__(self) -> None:
        at_least(self, 0, "dataloader_num_workers", "image_memory_mib")


@dataclass(frozen=True)
class ModelConfig:
    """The models: the base folder, where trained transformers go, and the tiny architecture."""

    base_path: str = "data/models/base"  # diffusers folder of the base model that SFT/SOAR start from
    pretrain_dir: str = "data/models/base"  # where the pretrain stage writes the tiny base (tiny: = base_path)
    models_dir: str = "data/models"  # post-trained transformers go to {models_dir}/{method}/transformer
    t5_max_length: int = 77  # training's T5 tokens per prompt when the folder has a T5 encoder (77 in the paper)
    text_encoder_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype the text encoders run in
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # architecture pretrain builds from scratch

    def __post_init__(self) -> None:
        at_least(self, 1, "t5_max_length")


# The tiny base is pretrained from scratch by plain flow matching: the train section's loop at a higher
# learning rate, larger batches and many more steps, with an EMA that is the base model.
PRETRAIN = TrainConfig(
    seed=0, learning_rate=1.0e-3, lr_scheduler="constant_with_warmup", lr_warmup_steps=50, train_batch_size=32,
    max_train_steps=6000,  # ~14 min on 2 cores; 3000 steps left the base at the metrics' floor
    snapshot_steps=0,  # the pretrained base is the start of the curves, not a part of them
    ema_decay=0.999,  # horizon ~1000 steps
    log_every=100, validation_steps=1000)


@dataclass(frozen=True)
class PromptFilesConfig:
    """The paper's public prompt files, fetched and SHA-256-checked by the prompt_files stage."""

    out_dir: str = "data/prompt_files"  # folder the files are written to, each under its name (+ manifest.json)
    files: list[PromptFileName] = ()  # which of pipeline/prompt_files.py's files to obtain ([] = none)
    source: str | None = None  # null = their public GitHub addresses; else a mirror folder or http(s)/file URL base

    def __post_init__(self) -> None:
        check(self.out_dir.strip() != "", "out_dir", "must not be empty")
        check(len(set(self.files)) == len(self.files), "files", "names a file twice")
        check(self.source is None or self.source.strip() != "", "source", "must be null or non-empty")


@dataclass(frozen=True)
class PromptSetConfig:
    """One evaluation prompt set."""

    path: str  # prompt file: GenEval metadata JSONL or one prompt per line
    format: PromptFormat  # how to read the file
    images_per_prompt: int = 1  # images sampled per prompt line

    def __post_init__(self) -> None:
        check(self.images_per_prompt >= 1, "images_per_prompt", "must be >= 1")


TINY_PROMPT_SETS = types.MappingProxyType({
    "geneval": PromptSetConfig("data/world/eval/geneval/metadata.jsonl", "geneval"),
    "ocr": PromptSetConfig("data/world/eval/ocr/prompts.txt", "text"),
})


@dataclass(frozen=True)
class SampleConfig:
    """Sampling the evaluation prompt sets with each model (stage sample@*)."""

    out_dir: str = "data/samples"  # samples go to {out_dir}/{model}/{prompt set}/
    num_inference_steps: int = 40  # Euler steps of the sampler (40 in the paper)
    guidance_scale: float = 4.5  # CFG scale (4.5 in the paper)
    resolution: int = 32  # image side, pixels (512 in the paper)
    batch_size: int = 48  # images per forward (CFG doubles it)
    t5_max_length: int = 256  # T5 tokens per prompt when sampling (diffusers' default, as the released evaluation)
    seed: int = 1234  # base seed; image (prompt i, image j) uses its own generator from (seed, i, j)
    grid_prompts: int = 6  # prompts per set shown side by side in the report grid
    prompt_sets: dict[str, PromptSetConfig] = field(default_factory=lambda: TINY_PROMPT_SETS)  # named prompt sets

    def __post_init__(self) -> None:
        at_least(self, 1, "num_inference_steps", "resolution", "batch_size", "t5_max_length")
        at_least(self, 0, "guidance_scale", "seed", "grid_prompts")


@dataclass(frozen=True)
class ScoreCheckpoints:
    """Local weights of the learned scorers (null = not here; a scorer that needs one stops naming its key)."""

    clip_vit_l14: str | None = None  # folder of openai/clip-vit-large-patch14 (ClipScore, Aesthetic, GenEval colours)
    pickscore: str | None = None  # folder of yuvalkirstain/PickScore_v1 (a CLIPModel)
    pickscore_processor: str | None = None  # folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's processor)
    aesthetic_mlp: str | None = None  # file sac+logos+ava1-l14-linearMSE.pth (LAION improved aesthetic predictor)
    hpsv21: str | None = None  # file HPS_v2.1_compressed.pt (open_clip ViT-H-14 weights)
    image_reward: str | None = None  # file ImageReward.pt (ImageReward-v1.0)
    image_reward_tokenizer: str | None = None  # folder of the bert-base-uncased tokenizer ImageReward's BLIP uses
    mask2former: str | None = None  # GenEval detector: its mmdetection .pth (the protocol's) or a transformers folder


@dataclass(frozen=True)
class ScoreConfig:
    """Scoring the samples (stage score@*): which scorers run on which prompt set, and their weights."""

    out_dir: str = "data/scores"  # per-image scores and metrics go to {out_dir}/{model}/
    scorers: dict[str, list[str]] = field(default_factory=lambda: types.MappingProxyType(
        {"geneval": ("geneval",), "ocr": ("ocr",)}))  # prompt set -> names of the scorers applied to it
    geneval_backend: Literal["tiny", "mask2former"] = "tiny"  # detector: exact tiny-world one or Mask2Former
    geneval_color_autocast: Literal["float16", "bfloat16"] | None = (
        "float16")  # autocast dtype of GenEval's CLIP colour forwards, CUDA only, as the official evaluator; null = off
    ocr_engine: Literal["rapidocr", "paddle"] = "rapidocr"  # PP-OCRv4 via rapidocr-onnxruntime, or PaddleOCR (extra)
    ocr_upscale: int = 256  # OCR input side: smaller images are upscaled to this, pixels
    batch_size: int = 64  # images per scorer call
    device: str = "auto"  # torch device of the learned scorers; "auto" = cuda when available, else cpu
    allow_download: bool = False  # fetch weights whose path is null from their hub ids (false: missing = error)
    checkpoints: ScoreCheckpoints = field(default_factory=ScoreCheckpoints)  # local weights of the learned scorers

    def __post_init__(self) -> None:
        at_least(self, 1, "ocr_upscale", "batch_size")


@dataclass(frozen=True)
class DynamicsConfig:
    """Training dynamics (stage dynamics@*): each ``train.snapshot_steps`` snapshot of SFT and SOAR sampled and
    scored like the final models (``sample`` and ``score`` settings), giving reward-vs-step curves."""

    out_dir: str = "data/dynamics"  # samples: {out_dir}/{method}/step-{N:06d}/{set}/; curves: {out_dir}/{method}.csv
    max_prompts_per_set: int | None = None  # prompts per set, evenly spaced in file order (every k-th); null = all

    def __post_init__(self) -> None:
        check(self.out_dir.strip() != "", "out_dir", "must not be empty")
        check(self.max_prompts_per_set is None or self.max_prompts_per_set >= 1, "max_prompts_per_set",
              "must be null or >= 1")


@dataclass(frozen=True)
class StudyConfig:
    """The multi-seed study (``dvc repro study/dvc.yaml``, pipeline/study.py): SFT and SOAR trained from the
    same base and data with several seeds, a lambda_aux x trajectory_length sweep, each evaluated like
    the sample/score stages plus the exposure-bias meter (soar/exposure.py) on held-out images."""

    out_dir: str = "data/study"  # per-run models and metrics: {out_dir}/runs/{run}/; tables: {out_dir}/report/
    seeds: list[int] = (0, 1, 2)  # train.seed of the SFT and SOAR runs (>= 2 for an interval)
    lambda_aux: list[float] = (0.5, 1.0, 2.0)  # sweep values of soar.lambda_aux (run with seeds[0])
    trajectory_length: list[int] = (1, 3, 6)  # sweep values of soar.trajectory_length (run with seeds[0])
    sampling_steps: list[int] = (10, 20, 40)  # Euler steps at which base and seed runs are also scored
    heldout_jsonl: str = "data/world/eval/heldout/heldout.jsonl"  # held-out captioned images for the meter
    heldout_image_dir: str = "data/world/eval/heldout/images"  # folder of the held-out images ({md5}.jpg)
    heldout_images: int | None = 32  # first N held-out images used by the meter; null = all
    drift_starts: list[int] = (0, 10, 20, 30)  # sampler sigma indices where meter rollouts start (1, .74, .49, .23)
    drift_max_k: int = 10  # sampler steps per meter rollout (k = 1..drift_max_k)
    drift_seed: int = 0  # seed of the meter's noise z1 (the same noise for every model)
    confidence: float = 0.95  # level of the SOAR - SFT interval (Welch)
    experiment: str = "soar-study"  # MLflow experiment of the study's runs (one parent run per configuration)

    def __post_init__(self) -> None:
        check(len(self.seeds) >= 2 and len(set(self.seeds)) == len(self.seeds), "seeds", "needs >= 2 distinct seeds")
        check(all(v > 0 for v in self.lambda_aux), "lambda_aux", "values must be > 0")
        check(all(v >= 1 for v in self.trajectory_length), "trajectory_length", "values must be >= 1")
        check(len(self.sampling_steps) > 0 and all(v >= 1 for v in self.sampling_steps), "sampling_steps",
              "needs values >= 1")
        check(len(self.drift_starts) > 0 and all(v >= 0 for v in self.drift_starts), "drift_starts",
              "needs indices >= 0")
        check(self.drift_max_k >= 1, "drift_max_k", "must be >= 1")
        check(all(v >= 0 for v in self.seeds), "seeds", "values must be >= 0")
        at_least(self, 0, "drift_seed")
        check(self.heldout_images is None or self.heldout_images >= 1, "heldout_images", "must be null or >= 1")
        check(0 < self.confidence < 1, "confidence", "must be in (0, 1)")


@dataclass(frozen=True)
class MlflowConfig:
    """Tracking."""

    experiment: str = "soar"  # MLflow experiment name
    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI or sqlite mlflow.db at the repo root
    log_images: bool = True  # log each sample run's per-set grid (prompts under the images) as artifacts
    grid_images: int = 24  # images in each of those grids: image 0 of the first prompts of the set

    def __post_init__(self) -> None:
        at_least(self, 1, "grid_images")


@dataclass(frozen=True)
class LaunchConfig:
    """How dvc.yaml launches the training and sampling stages (accelerate launch)."""

    num_processes: int = 1  # processes per machine for accelerate launch
    num_machines: int = 1  # machines for accelerate launch
    config_file: str = "pipeline/launch/cpu.yaml"  # accelerate config file

    def __post_init__(self) -> None:
        at_least(self, 1, "num_processes", "num_machines")
        check(self.num_processes >= self.num_machines, "num_processes",
              "is accelerate's total over all machines: must be >= num_machines")


@dataclass(frozen=True)
class Config:
    """The whole of ``params.yaml``, one field per section; a stage sees None for sections it did not declare."""

    synth: SynthConfig | None = field(default_factory=SynthConfig)  # the tiny world (stage synth; tiny profile only)
    data: DataConfig | None = field(default_factory=DataConfig)  # training data, prepare's filter, caches
    model: ModelConfig | None = field(default_factory=ModelConfig)  # the base model and where models go
    pretrain: TrainConfig | None = PRETRAIN  # pretraining the tiny base from scratch (stage pretrain; tiny only)
    train: TrainConfig | None = field(default_factory=TrainConfig)  # post-training, SFT and SOAR alike (stage train@*)
    soar: SoarConfig | None = field(default_factory=SoarConfig)  # SOAR's rollout and auxiliary loss (train@soar)
    grpo: GrpoConfig | None = field(default_factory=GrpoConfig)  # Flow-GRPO, the reward-driven arm (train@grpo)
    prompt_files: PromptFilesConfig | None = field(default_factory=PromptFilesConfig)  # public prompt sets
    sample: SampleConfig | None = field(default_factory=SampleConfig)  # evaluation sampling (stage sample@*)
    references: dict[str, ReferenceConfig] | None = field(
        default_factory=lambda: types.MappingProxyType({}))  # reference models: name -> rows of the results table
    score: ScoreConfig | None = field(default_factory=ScoreConfig)  # evaluation scoring (stage score@*)
    dynamics: DynamicsConfig | None = field(default_factory=DynamicsConfig)  # reward-vs-step curves (stage dynamics@*)
    study: StudyConfig | None = field(default_factory=StudyConfig)  # the multi-seed study (study/dvc.yaml)
    mlflow: MlflowConfig | None = field(default_factory=MlflowConfig)  # MLflow tracking
    launch: LaunchConfig | None = field(default_factory=LaunchConfig)  # how dvc.yaml launches processes


    def __post_init__(self) -> None:
        if self.references:
            try:
                check_reference_names(self.references)
            except ConfigError as err:
                raise ConfigError(f"references.{err}", f"references.{err.key}") from None
        if self.sample is not None and self.score is not None:  # a prompt set scored but never sampled
            unknown = sorted(set(self.score.scorers) - set(self.sample.prompt_sets))
            if unknown:
                raise ConfigError(f"score.scorers.{unknown[0]}: no prompt set of that name in sample.prompt_sets "
                                  f"(it has: {', '.join(self.sample.prompt_sets)}); add it there or remove it here")


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def parse_config(raw: dict, source: str = "params.yaml") -> Config:
    """Validate a whole params mapping (absent sections and keys keep their defaults)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return build(Config, raw, source)


def read_params(path: str | Path) -> dict:
    """The raw mapping in ``path``, read as YAML 1.2 (as DVC reads and writes params.yaml)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameters file not found: {path}")
    with path.open() as f:
        data = YAML(typ="safe", pure=True).load(f)
    return {} if data is None else data


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
