"""Reference models (``pipeline/references.py``) on tiny folders in the real diffusers layouts of SD-XL, SD3.5 and
FLUX.1-dev (``tests/reference_layouts.py``, ``tests/sd35_layout.py``): loaded by ``load_reference`` and sampled by
``sample_reference`` on the CPU in float32, compared bit for bit with the family's own diffusers pipeline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from reference_layouts import (
    FLUX_LATENT_CHANNELS,
    FLUX_SCHEDULER,
    SDXL_LATENT_CHANNELS,
    SDXL_SCHEDULER,
    write_flux_folder,
    write_sdxl_folder,
)
from sd35_layout import LATENT_CHANNELS as SD3_LATENT_CHANNELS
from sd35_layout import write_sd35_folder

from pipeline.references import FAMILIES, ReferenceConfig, load_reference, sample_reference, settings
from soar.euler import initial_noise
from soar.schema import ConfigError, build

CPU = torch.device("cpu")
NAME = "tiny"  # the reference's key under params.yaml references
PROMPTS = ["a photo of a cat", "two red dogs on a bench", "a sign that says sky"]
SEEDS = [11, 12, 13]
RESOLUTION, STEPS, T5_LENGTH = 64, 3, 12  # 64 px: a multiple of 8 (SD-XL) and 16 (SD3 patches, FLUX packing)
WRITERS = {"sdxl": write_sdxl_folder, "sd3": write_sd35_folder, "flux": write_flux_folder}
CLASSES = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
SETTINGS = {  # each family's own settings, as params.yaml would give them
    "sdxl": {"guidance_scale": 5.0, "negative_prompt": "blurry"},
    "sd3": {"guidance_scale": 4.5, "negative_prompt": "blurry", "max_sequence_length": T5_LENGTH},
    "flux": {"guidance_scale": 3.5, "negative_prompt": None, "max_sequence_length": T5_LENGTH},
}


def reference(family: str, path, **changes) -> ReferenceConfig:
    data = {"path": str(path), "family": family, "label": family, "resolution": RESOLUTION,
            "num_inference_steps": STEPS, "batch_size": len(PROMPTS), **SETTINGS[family], **changes}
    return build(ReferenceConfig, data, f"params.yaml.references.{NAME}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("references")
    return {family: write(root / family) for family, write in WRITERS.items()}


@pytest.fixture(scope="module", params=list(WRITERS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def loaded(family, folders):
    """``(ref, pipe)``: the family's reference config and ``load_reference``'s pipeline on the CPU."""
    ref = reference(family, folders[family])
    return ref, load_reference(ref, CPU, NAME)


@pytest.fixture(scope="module")
def direct(family, folders):
    """The family's diffusers pipeline class on the same folder in float32, no offload, progress bars off."""
    extra = {"add_watermarker": False} if family == "sdxl" else {}
    pipe = CLASSES[family].from_pretrained(folders[family], torch_dtype=torch.float32, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def per_seed_latents(family: str, seeds) -> torch.Tensor:
    """The initial noise, written out per family: unit normal from one CPU generator per seed, in the shape each
    pipeline's ``prepare_latents`` draws (FLUX: ``[N, 16, 8, 8]`` packed in 2x2 patches into ``[N, 16, 64]``)."""
    side = RESOLUTION // 8
    if family == "flux":
        z = initial_noise(seeds, (FLUX_LATENT_CHANNELS, side, side))
        return FluxPipeline._pack_latents(z, len(seeds), FLUX_LATENT_CHANNELS, side, side)
    return initial_noise(seeds, (SDXL_LATENT_CHANNELS if family == "sdxl" else SD3_LATENT_CHANNELS, side, side))


def diffusers_images(pipe, ref: ReferenceConfig, prompts, **noise) -> np.ndarray:
    """The family pipeline called directly, PIL output, as uint8 ``[N, H, W, 3]``."""
    extra = {"negative_prompt": ref.negative_prompt} if ref.negative_prompt is not None else {}
    if ref.max_sequence_length is not None:
        extra["max_sequence_length"] = ref.max_sequence_length
    out = pipe(prompt=list(prompts), height=RESOLUTION, width=RESOLUTION, num_inference_steps=STEPS,
               guidance_scale=ref.guidance_scale, output_type="pil", **extra, **noise).images
    return np.stack([np.asarray(im) for im in out])


def config(folder, file: str) -> dict:
    return json.loads((folder / file).read_text())


def test_folders_have_the_released_layout(folders):
    """The SD-XL and FLUX.1-dev settings that decide how the pipelines sample (``tests/reference_layouts.py``)."""
    sdxl, flux = folders["sdxl"], folders["flux"]
    assert config(sdxl, "model_index.json")["force_zeros_for_empty_prompt"] is True
    unet = config(sdxl, "unet/config.json")
    assert unet["addition_embed_type"] == "text_time" and unet["in_channels"] == SDXL_LATENT_CHANNELS
    encoders = [config(sdxl, f"text_encoder{s}/config.json") for s in ("", "_2")]
    assert unet["cross_attention_dim"] == sum(e["hidden_size"] for e in encoders)
    assert unet["projection_class_embeddings_input_dim"] == (6 * unet["addition_time_embed_dim"]
                                                             + encoders[1]["projection_dim"])
    assert {k: config(sdxl, "scheduler/scheduler_config.json")[k] for k in SDXL_SCHEDULER} == SDXL_SCHEDULER
    assert config(sdxl, "vae/config.json")["scaling_factor"] == 0.13025
    transformer = config(flux, "transformer/config.json")
    assert transformer["guidance_embeds"] is True and transformer["in_channels"] == 4 * FLUX_LATENT_CHANNELS
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert transformer["pooled_projection_dim"] == config(flux, "text_encoder/config.json")["hidden_size"]
    assert transformer["joint_attention_dim"] == config(flux, "text_encoder_2/config.json")["d_model"]
    assert {k: config(flux, "scheduler/scheduler_config.json")[k] for k in FLUX_SCHEDULER} == FLUX_SCHEDULER
    vae = config(flux, "vae/config.json")
    assert (vae["scaling_factor"], vae["shift_factor"], vae["use_quant_conv"]) == (0.3611, 0.1159, False)
    index = config(flux, "model_index.json")
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]


def test_loaded_pipeline(family, loaded):
    ref, pipe = loaded
    assert type(pipe) is CLASSES[family] and pipe.dtype == torch.float32 and pipe._execution_device == CPU
    assert {p.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()} \
        == {torch.float32}
    assert pipe._progress_bar_config == {"disable": True}
    latents = FAMILIES[family].noise(pipe, SEEDS, RESOLUTION)
    assert torch.equal(latents, per_seed_latents(family, SEEDS))


def test_sample_equals_the_family_pipeline(family, loaded, direct):
    """``sample_reference`` = the family's pipeline called directly with the same prompts, per-seed latents,
    steps and guidance, bit for bit; and = the pipeline drawing the noise itself from one CPU generator per image."""
    ref, pipe = loaded
    images = sample_reference(pipe, ref, PROMPTS, SEEDS)
    assert images.shape == (3, RESOLUTION, RESOLUTION, 3) and images.dtype == np.uint8
    assert np.array_equal(images, diffusers_images(direct, ref, PROMPTS, latents=per_seed_latents(family, SEEDS)))
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    assert np.array_equal(images, diffusers_images(direct, ref, PROMPTS, generator=generators))
    assert min(im.std() for im in images) > 5  # not blank


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to the VAE decode's float rounding, which depends on how the threads split the batch (with one
    thread the bytes are equal; with two, 1 value in 12,288 moved one grey level here)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(diff.max()) <= 1 and float((diff > 0).mean()) < 1e-3


def test_image_depends_on_its_own_seed_and_prompt(family, loaded):
    """The same (prompt, seed) at another position of a batch of the same size gives the same image; other seeds
    give other images."""
    ref, pipe = loaded
    images = sample_reference(pipe, ref, PROMPTS, SEEDS)
    order = [2, 0, 1]
    moved = sample_reference(pipe, ref, [PROMPTS[i] for i in order], [SEEDS[i] for i in order])
    for j, i in enumerate(order):
        assert same_image(moved[j], images[i]), (family, i)
    same_prompt = sample_reference(pipe, ref, [PROMPTS[0]] * 3, SEEDS)
    assert same_image(same_prompt[0], images[0])
    assert all(np.abs(same_prompt[i].astype(int) - same_prompt[j]).mean() > 1 for i, j in [(0, 1), (0, 2), (1, 2)])


def test_flux_guidance_goes_to_the_guidance_embedding(folders):
    """FLUX.1-dev: ``guidance_scale`` reaches the transformer's ``guidance`` input ``[N]``, one forward per step
    (no true CFG: no negative prompt is passed), and other values give other images."""
    ref = reference("flux", folders["flux"])
    pipe = load_reference(ref, CPU, NAME)
    assert pipe.transformer.config.guidance_embeds
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda _m, _args, kwargs: seen.append(kwargs["guidance"]),
                                                      with_kwargs=True)
    try:
        images = sample_reference(pipe, ref, PROMPTS, SEEDS)
    finally:
        hook.remove()
    assert len(seen) == STEPS and all(torch.equal(g, torch.full((3,), 3.5)) for g in seen)
    other = sample_reference(pipe, reference("flux", folders["flux"], guidance_scale=1.5), PROMPTS, SEEDS)
    assert np.abs(other.astype(int) - images).mean() > 0.5


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_images_raise(folders, value):
    """An image decoded with infinity (which the pipeline's clamp would turn into white) or NaN raises, naming how
    many images and the first one's prompt and seed."""
    ref = reference("flux", folders["flux"])
    pipe = load_reference(ref, CPU, NAME)
    hook = pipe.vae.decoder.register_forward_hook(lambda _m, _args, out: out.index_fill(0, torch.tensor([1]), value))
    try:
        with pytest.raises(FloatingPointError, match=r"1 of 3 image\(s\) came out NaN or infinite, first for prompt "
                                                     r"'two red dogs on a bench' \(seed 12\)"):
            sample_reference(pipe, ref, PROMPTS, SEEDS)
    finally:
        hook.remove()


def test_load_errors(folders, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"references.{NAME}.path: {missing} does not exist"):
        load_reference(reference("sd3", missing), CPU, NAME)
    with pytest.raises(FileNotFoundError, match=f"references.{NAME}.path: {tmp_path} has no model_index.json"):
        load_reference(reference("sd3", tmp_path), CPU, NAME)
    with pytest.raises(ValueError, match=f"references.{NAME}.family: 'flux' samples with FluxPipeline, but .* names "
                                         "StableDiffusion3Pipeline"):
        load_reference(reference("flux", folders["sd3"]), CPU, NAME)
    with pytest.raises(ValueError, match=f"references.{NAME}.cpu_offload: needs a CUDA device"):
        load_reference(reference("sdxl", folders["sdxl"], cpu_offload=True), CPU, NAME)
    with pytest.raises(ValueError, match=f"references.{NAME}.resolution: 72 is not a multiple of 16 px"):
        load_reference(reference("flux", folders["flux"], resolution=72), CPU, NAME)


def test_vae_tiling(folders):
    pipe = load_reference(reference("sd3", folders["sd3"], vae_tiling=True), CPU, NAME)
    assert pipe.vae.use_tiling


def test_settings(folders):
    got = settings(reference("flux", folders["flux"]))
    assert got == {"family": "flux", "pipeline": "FluxPipeline", "resolution": RESOLUTION, "num_inference_steps": STEPS,
                   "guidance_scale": 3.5, "negative_prompt": None, "max_sequence_length": T5_LENGTH,
                   "vae_tiling": False}
    json.dumps(got)  # the guard file is JSON
    assert settings(reference("sdxl", folders["sdxl"]))["negative_prompt"] == "blurry"
    # what does not change the images (where the model lives, batch size, offload, the row's label) is left out
    same = reference("flux", "elsewhere", batch_size=1, label="FLUX.1-dev")
    assert settings(same) == got


@pytest.mark.parametrize(("family", "changes", "key"), [
    ("flux", {"negative_prompt": "blurry", "max_sequence_length": 512}, "negative_prompt"),
    ("sdxl", {"negative_prompt": "", "max_sequence_length": 77}, "max_sequence_length"),
    ("sd3", {"negative_prompt": ""}, "max_sequence_length"),
    ("sdxl", {"negative_prompt": None}, "negative_prompt"),
])
def test_config_validation(family, changes, key):
    data = {"path": "models/x", "family": family, "label": "x", **changes}
    with pytest.raises(ConfigError, match=rf"^params\.yaml\.references\.x\.{key}: "):
        build(ReferenceConfig, data, "params.yaml.references.x")
