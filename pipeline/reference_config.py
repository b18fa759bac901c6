"""The ``references`` section of ``params.yaml``: public models sampled and scored as rows of the results table
(stages ``sample_ref@<name>``, ``score_ref@<name>``; the sampling code is ``pipeline.references``). Kept apart
from that code so that editing it reruns only the reference stages, not every stage that reads the config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.arms import MODELS
from soar.schema import at_least, check

ReferenceFamily = Literal["sdxl", "sd3", "flux"]
RESERVED_NAMES = MODELS  # the pipeline's own models: folders and stages of those names exist
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")  # a reference name: stage, folder and MLflow run name part


@dataclass(frozen=True)
class ReferenceConfig:
    """One reference model and its own sampling settings."""

    path: str  # local diffusers folder of the model (model_index.json at its root)
    family: ReferenceFamily  # diffusers pipeline: StableDiffusionXL, StableDiffusion3 or Flux
    label: str  # its row in the results table, e.g. "SD-XL (1024²)"
    resolution: int = 1024  # image side, pixels
    num_inference_steps: int = 40  # steps of the family's own scheduler
    guidance_scale: float = 4.5  # CFG scale; flux: the value its guidance embedding receives (no second forward)
    negative_prompt: str | None = ""  # the negative prompt; null for flux, which takes none
    max_sequence_length: int | None = None  # T5 tokens per prompt (sd3, flux); null for sdxl (CLIP only)
    batch_size: int = 4  # prompts per pipeline call
    cpu_offload: bool = False  # diffusers' enable_model_cpu_offload: each submodule on the GPU only while it runs
    vae_tiling: bool = False  # decode the latents in tiles (the VAE's memory at 1024 px and above)

    def __post_init__(self) -> None:
        at_least(self, 1, "resolution", "num_inference_steps", "batch_size")
        at_least(self, 0, "guidance_scale")
        check(self.path.strip() != "", "path", "must name the model's diffusers folder")
        check(self.label.strip() != "", "label", "must not be empty (the row's name in the results table)")
        check(self.family != "flux" or self.negative_prompt is None, "negative_prompt",
              "must be null for flux (FluxPipeline takes no negative prompt)")
        check(self.family == "flux" or self.negative_prompt is not None, "negative_prompt",
              f"must be a string for {self.family} (\"\" = the empty prompt)")
        check((self.family == "sdxl") == (self.max_sequence_length is None), "max_sequence_length",
              "must be null for sdxl (no T5) and a token count for sd3 and flux")
        check(self.max_sequence_length is None or self.max_sequence_length >= 1, "max_sequence_length", "must be >= 1")


def check_reference_names(names) -> None:
    """Reference names must be lower-case identifiers other than the pipeline's own model names."""
    for name in names:
        check(NAME_PATTERN.fullmatch(name) is not None, name,
              "a reference name is lower-case letters, digits, '-' and '_', starting with a letter or digit")
        check(name not in RESERVED_NAMES, name, f"is one of the pipeline's own models ({', '.join(RESERVED_NAMES)})")
