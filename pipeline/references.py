"""Reference models: public text-to-image models sampled and scored on the same prompt sets, seeds and
scorers as base / SFT / SOAR, each through its own diffusers pipeline (the results table's other rows).

``params.yaml`` ``references`` maps a name to a ``ReferenceConfig`` (``pipeline.reference_config``); each name
gets the stages ``sample_ref@<name>`` and ``score_ref@<name>`` (an empty mapping adds none).
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.reference_config import ReferenceConfig
from soar.euler import initial_noise


@dataclass(frozen=True)
class Family:
    """What differs between the families' diffusers pipelines; ``pipe`` below is a loaded pipeline of the class."""

    pipeline_class: str  # the diffusers class, as model_index.json's _class_name names it
    pixel_multiple: Callable[[Any], int]  # pipe -> the image side must be a multiple of it
    noise: Callable[[Any, Sequence[int], int], torch.Tensor]  # (pipe, seeds, side in px) -> the latents= to pass
    call_kwargs: Callable[[ReferenceConfig], dict]  # the family's own __call__ arguments
    load_kwargs: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))  # from_pretrained's


def unet_noise(pipe, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    """``[N, unet.in_channels, H / f, W / f]`` unit normal (f = ``pipe.vae_scale_factor``), one CPU generator per
    seed: the shape SDXL's ``prepare_latents`` draws; it multiplies passed latents by ``init_noise_sigma`` itself."""
    side = resolution // pipe.vae_scale_factor
    return initial_noise(seeds, (pipe.unet.config.in_channels, side, side))


def sd3_noise(pipe, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    """``[N, transformer.in_channels, H / f, W / f]`` unit normal: SD3's ``prepare_latents`` shape (used as passed)."""
    side = resolution // pipe.vae_scale_factor
    return initial_noise(seeds, (pipe.transformer.config.in_channels, side, side))


def flux_noise(pipe, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    """Packed ``[N, (h / 2) * (w / 2), 4 C]``: unit normal ``[N, C, h, w]`` with C = transformer.in_channels / 4 and
    h = w = 2 * (H // (2 f)), packed in 2x2 patches by ``FluxPipeline._pack_latents``, as its ``prepare_latents``."""
    channels, side = pipe.transformer.config.in_channels // 4, 2 * (resolution // (pipe.vae_scale_factor * 2))
    return pipe._pack_latents(initial_noise(seeds, (channels, side, side)), len(seeds), channels, side, side)


FAMILIES: Mapping[str, Family] = types.MappingProxyType({
    # add_watermarker=False: diffusers watermarks SDXL's outputs whenever the optional invisible-watermark package
    # is installed; the images must not depend on that. negative_prompt "" encodes the empty prompt (diffusers'
    # default None would take zero embeddings instead, the folder's force_zeros_for_empty_prompt)
    "sdxl": Family("StableDiffusionXLPipeline", lambda pipe: pipe.vae_scale_factor, unet_noise,
                   lambda ref: {"negative_prompt": ref.negative_prompt},
                   types.MappingProxyType({"add_watermarker": False})),
    "sd3": Family("StableDiffusion3Pipeline", lambda pipe: pipe.vae_scale_factor * pipe.patch_size, sd3_noise,
                  lambda ref: {"negative_prompt": ref.negative_prompt, "max_sequence_length": ref.max_sequence_length}),
    # no negative prompt: FluxPipeline's true CFG (a second forward) stays off; guidance_scale goes to the
    # guidance embedding when transformer.config.guidance_embeds (FLUX.1-dev), else it is unused
    "flux": Family("FluxPipeline", lambda pipe: pipe.vae_scale_factor * 2, flux_noise,
                   lambda ref: {"max_sequence_length": ref.max_sequence_length}),
})


def load_reference(ref: ReferenceConfig, device: torch.device, name: str):
    """The family's diffusers pipeline on ``ref.path``, ready to sample on ``device``.

    Equals ``<Pipeline>.from_pretrained(ref.path, torch_dtype=bf16 on CUDA / fp32 otherwise, local_files_only=True)``
    then ``enable_model_cpu_offload(device=device)`` (``ref.cpu_offload``) or ``.to(device)``,
    ``vae.enable_tiling()`` (``ref.vae_tiling``) and ``set_progress_bar_config(disable=True)``. ``name`` is the key
    under ``references`` that errors name: ``FileNotFoundError`` for a missing folder or model_index.json
    (``.path``), ``ValueError`` for another pipeline class (``.family``), ``cpu_offload`` off CUDA and a
    resolution the pipeline cannot make (``.resolution``).
    """
    import diffusers

    from pipeline.sample_sets import sampling_dtype

    key, family, root = f"references.{name}", FAMILIES[ref.family], Path(ref.path)
    if ref.cpu_offload and device.type != "cuda":
        raise ValueError(f"{key}.cpu_offload: needs a CUDA device (each submodule is moved to the GPU while it "
                         f"runs), not {device.type}; set it to false")
    if not (root / "model_index.json").is_file():
        why = "has no model_index.json (not a diffusers pipeline folder)" if root.is_dir() else "does not exist"
        raise FileNotFoundError(f"{key}.path: {root} {why}")
    found = json.loads((root / "model_index.json").read_text()).get("_class_name")
    if found != family.pipeline_class:
        raise ValueError(f"{key}.family: {ref.family!r} samples with {family.pipeline_class}, but "
                         f"{root / 'model_index.json'} names {found}")
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
        root, torch_dtype=sampling_dtype(device), local_files_only=True, **family.load_kwargs)
    multiple = family.pixel_multiple(pipe)
    if ref.resolution % multiple:
        raise ValueError(f"{key}.resolution: {ref.resolution} is not a multiple of {multiple} px "
                         f"({family.pipeline_class} on this model)")
    if ref.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if ref.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_reference(pipe, ref: ReferenceConfig, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    """One image per prompt, image i from ``seeds[i]``'s own noise (``Family.noise``): uint8 RGB ``[N, H, W, 3]``.

    ONE pipeline call: ``pipe(prompt=list(prompts), latents=noise on the pipeline's device and dtype,
    height=width=ref.resolution, num_inference_steps, guidance_scale, output_type="np", **family kwargs)``, its
    ``[N, H, W, 3]`` float output in [0, 1] turned into uint8 as diffusers' ``numpy_to_pil`` does
    (``(x * 255).round()``), so the bytes equal the pipeline's PIL images. A decoded image holding NaN or infinity
    (seen at the VAE decoder's output, before the pipeline clamps it) raises ``FloatingPointError``.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    family, n = FAMILIES[ref.family], len(seeds)
    latents = family.noise(pipe, seeds, ref.resolution).to(pipe._execution_device, pipe.dtype)
    flags = []  # per decoder call (several when tiled): which images hold a non-finite value
    hook = pipe.vae.decoder.register_forward_hook(
        lambda _module, _args, out: flags.append(~torch.isfinite(out.flatten(1)).all(dim=1).cpu()))
    try:
        images = pipe(prompt=list(prompts), latents=latents, height=ref.resolution, width=ref.resolution,
                      num_inference_steps=ref.num_inference_steps, guidance_scale=ref.guidance_scale,
                      output_type="np", **family.call_kwargs(ref)).images
    finally:
        hook.remove()
    bad = ~np.isfinite(images.reshape(n, -1)).all(axis=1)
    for f in flags:
        bad |= f.numpy()
    if bad.any():
        i = int(bad.argmax())
        raise FloatingPointError(f"{int(bad.sum())} of {n} image(s) came out NaN or infinite, first for prompt "
                                 f"{prompts[i]!r} (seed {seeds[i]}); nothing of this batch is saved")
    return (images * 255).round().astype(np.uint8)


def settings(ref: ReferenceConfig) -> dict:
    """What a reference's images are a function of besides its model files, dtype and device (the caller adds
    those): for the sample folder's guard file."""
    return {"family": ref.family, "pipeline": FAMILIES[ref.family].pipeline_class, "resolution": ref.resolution,
            "num_inference_steps": ref.num_inference_steps, "guidance_scale": ref.guidance_scale,
            "negative_prompt": ref.negative_prompt, "max_sequence_length": ref.max_sequence_length,
            "vae_tiling": ref.vae_tiling}


def reference_digest(ref: ReferenceConfig) -> str:
    """The model folder's file names and sizes (hashing tens of GB of weights per run would cost minutes)."""
    from pipeline.sample_layout import folder_digest

    return folder_digest(ref.path, content=False)


def reference_settings(ref: ReferenceConfig, digest: str, seed: int, entries: list[dict], device: torch.device
                       ) -> dict:
    """A set's ``sampling.json`` for reference ``ref``: ``settings`` plus the model, the seeds, the prompts and
    the dtype and device the images were made with."""
    from pipeline.sample_sets import prompts_digest, sampling_dtype

    return {**settings(ref), "model": digest, "seed": seed, "prompts_sha256": prompts_digest(entries),
            "dtype": str(sampling_dtype(device)).removeprefix("torch."), "device": device.type}


def reference_sampler(ref: ReferenceConfig, name: str, device: torch.device):
    """``pipeline.sample_sets.Sampler`` of reference ``name``: its pipeline loaded once, then ``sample_reference``."""
    pipe = load_reference(ref, device, name)
    return lambda prompts, seeds: sample_reference(pipe, ref, prompts, seeds)
