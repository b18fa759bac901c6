"""A tiny folder laid out like Stable Diffusion 3.5 Medium (``tests/sd35_layout.py``) through this project's loader,
prompt encoder and sampler, compared bit for bit with diffusers' ``StableDiffusion3Pipeline`` on the same folder.

Every test runs on the folder with T5 and on the same folder without T5 (diffusers' ``text_encoder_3=None``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors import safe_open
from sd35_layout import (
    CLIP_G_PROJ,
    CLIP_L_PROJ,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    LATENT_CHANNELS,
    PATCH_SIZE,
    SCALING_FACTOR,
    SHIFT_FACTOR,
    T5_WIDTH,
    VAE_FACTOR,
    write_sd35_folder,
)

from soar.euler import image_seed, initial_noise, sample, sample_embeds, sampling_sigmas
from soar.models.bundle import load_bundle

T5_LENGTH = 12  # T5 tokens per prompt: fewer than LONG's, so T5 truncation is exercised
LONG = "two red dogs on a bench under the blue sky and a green table with a sign that says cat " * 5
PROMPTS = ["a photo of a cat", LONG]  # LONG: more than 77 CLIP tokens and more than T5_LENGTH T5 tokens
STEPS, GUIDANCE, RESOLUTION, SEED = 4, 4.5, 64, 11
COMMON_FILES = {"model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors"}
COMMON_FILES |= {f"text_encoder{s}/{f}" for s in ("", "_2") for f in ("config.json", "model.safetensors")}
COMMON_FILES |= {f"tokenizer{s}/{f}" for s in ("", "_2")
                 for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")}


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no_t5"])
def folder(request, tmp_path_factory):
    return write_sd35_folder(tmp_path_factory.mktemp("sd35") / "model", t5=request.param)


def has_t5(folder) -> bool:
    return (folder / "text_encoder_3").is_dir()


@pytest.fixture(scope="module")
def pipe(folder):
    """diffusers' pipeline on ``folder`` in float32 (without T5 as diffusers documents: text_encoder_3=None)."""
    no_t5 = {} if has_t5(folder) else {"text_encoder_3": None, "tokenizer_3": None}
    return StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True,
                                                    **no_t5)


def test_folder_has_the_released_layout(folder):
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    index = json.loads((folder / "model_index.json").read_text())
    if has_t5(folder):
        t5_files = files - COMMON_FILES
        shards = json.loads((folder / "text_encoder_3" / "model.safetensors.index.json").read_text())["weight_map"]
        assert {"text_encoder_3/config.json", "text_encoder_3/model.safetensors.index.json",
                "tokenizer_3/tokenizer.json", "tokenizer_3/tokenizer_config.json"} <= t5_files
        assert len(set(shards.values())) >= 2 and {f"text_encoder_3/{s}" for s in shards.values()} <= t5_files
        assert "text_encoder_3/model.safetensors" not in files
        assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
        assert index["tokenizer_3"] == ["transformers", "T5TokenizerFast"]
    else:
        assert files == COMMON_FILES
        assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    for weights in folder.rglob("*.safetensors"):  # every stored weight is float16, as released
        with safe_open(weights, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, weights

    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    assert transformer["qk_norm"] == "rms_norm" and transformer["dual_attention_layers"] == [0]
    assert transformer["patch_size"] == PATCH_SIZE
    assert transformer["in_channels"] == transformer["out_channels"] == LATENT_CHANNELS
    assert transformer["joint_attention_dim"] == T5_WIDTH
    assert transformer["pooled_projection_dim"] == CLIP_L_PROJ + CLIP_G_PROJ
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert 2 ** (len(vae["block_out_channels"]) - 1) == VAE_FACTOR and vae["latent_channels"] == LATENT_CHANNELS
    assert (vae["scaling_factor"], vae["shift_factor"]) == (SCALING_FACTOR, SHIFT_FACTOR)
    assert vae["use_quant_conv"] is False and vae["use_post_quant_conv"] is False
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0


def test_clip_tokenizers_are_openai_clip(folder):
    """Both CLIP tokenizers hold OpenAI CLIP's BPE: the same ids as open_clip's ViT-L-14 tokenizer."""
    open_clip = pytest.importorskip("open_clip")
    from transformers import CLIPTokenizer

    reference = open_clip.get_tokenizer("ViT-L-14")
    texts = ["a photo of a cat", "Two dogs, 3 cats and a sign that says \"SOAR\"; naïve café", LONG]
    tok_l, tok_g = (CLIPTokenizer.from_pretrained(folder / name) for name in ("tokenizer", "tokenizer_2"))
    for tok in (tok_l, tok_g):
        assert len(tok) == CLIP_VOCAB_SIZE and tok.model_max_length == CLIP_MAX_LENGTH
        ids = tok(texts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True).input_ids
        for row, ref in zip(ids, reference(texts).tolist(), strict=True):
            n = ref.index(49407) + 1  # open_clip pads with 0 after <|endoftext|>
            assert row[:n] == ref[:n] and len(row) == CLIP_MAX_LENGTH
    short = tok_l("a cat", padding="max_length", max_length=CLIP_MAX_LENGTH).input_ids
    assert short[:4] == [49406, 320, 2368, 49407] and set(short[4:]) == {49407}  # CLIP-L pads with <|endoftext|>
    assert set(tok_g("a cat", padding="max_length", max_length=CLIP_MAX_LENGTH).input_ids[4:]) == {0}  # with "!"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "float16"])
def test_encoders_load_in_the_requested_dtype(folder, dtype):
    """The text encoders run in ``text_encoder_dtype``, not in their stored float16 (unless asked; in float16
    transformers keeps T5's ``wo`` layers in float32, its ``_keep_in_fp32_modules``); the transformer and the VAE
    in float32; ``encode_prompts`` returns float32 ``[B, 77 + T5_LENGTH, T5_WIDTH]``."""
    bundle = load_bundle(folder, t5_max_length=T5_LENGTH, text_encoder_dtype=dtype)
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    encoders = [*bundle.clip_encoders, *([bundle.t5_encoder] if has_t5(folder) else [])]
    assert len(encoders) == (3 if has_t5(folder) else 2) and (bundle.t5_encoder is None) != has_t5(folder)
    for module in encoders:
        fp32 = module._keep_in_fp32_modules if want == torch.float16 else []
        for name, p in module.named_parameters():
            assert p.dtype == (torch.float32 if set(name.split(".")) & set(fp32 or []) else want), name
    for module in (bundle.transformer, bundle.codec.vae):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    embeds, pooled = bundle.encode_prompts(PROMPTS)
    assert embeds.dtype == pooled.dtype == torch.float32
    assert embeds.shape == (2, CLIP_MAX_LENGTH + T5_LENGTH, T5_WIDTH) and pooled.shape == (2, CLIP_L_PROJ + CLIP_G_PROJ)


def test_text_encoder_dtype_must_be_a_float_dtype(folder):
    with pytest.raises(ValueError, match="text_encoder_dtype 'int8' is not a floating dtype"):
        load_bundle(folder, text_encoder_dtype="int8")


def test_encode_prompts_equals_diffusers(folder, pipe):
    """``encode_prompts`` = ``StableDiffusion3Pipeline.encode_prompt`` exactly, prompts and negative prompts, for
    prompts longer than the CLIP and the T5 lengths; without T5 the last T5_LENGTH tokens are zeros."""
    tokenizer = pipe.tokenizer
    assert len(tokenizer(LONG).input_ids) > CLIP_MAX_LENGTH  # the premise: LONG is truncated
    if has_t5(folder):
        assert len(pipe.tokenizer_3(LONG).input_ids) > T5_LENGTH
    bundle = load_bundle(folder, t5_max_length=T5_LENGTH)
    with torch.no_grad():  # as in the pipeline's __call__
        want = pipe.encode_prompt(PROMPTS, None, None, negative_prompt="", max_sequence_length=T5_LENGTH)
    embeds, pooled = bundle.encode_prompts(PROMPTS)
    neg_embeds, neg_pooled = bundle.encode_prompts(["", ""])
    for got, ref in zip((embeds, neg_embeds, pooled, neg_pooled), want, strict=True):
        assert got.shape == ref.shape and torch.equal(got, ref)
    assert embeds.shape == (2, CLIP_MAX_LENGTH + T5_LENGTH, T5_WIDTH)
    assert not torch.equal(embeds[0], embeds[1])
    t5_part = embeds[:, CLIP_MAX_LENGTH:]
    assert (t5_part.abs().amax() > 0) == has_t5(folder)


def decode_spy(codec) -> dict:
    """Record the latents ``z [N, 16, h, w]`` and the images ``x [N, 3, 8h, 8w]`` of ``codec.decode``'s next call."""
    seen, decode = {}, codec.decode

    def spy(z):
        seen["z"], seen["x"] = z.clone(), decode(z)
        return seen["x"]

    codec.decode = spy
    return seen


def diffusers_images(pipe, seeds, output_type):
    """diffusers' images of PROMPTS from the same initial noise as ``soar.euler`` (one CPU generator per seed)."""
    z1 = initial_noise(seeds, (LATENT_CHANNELS, RESOLUTION // VAE_FACTOR, RESOLUTION // VAE_FACTOR))
    return pipe(PROMPTS, negative_prompt="", latents=z1, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                height=RESOLUTION, width=RESOLUTION, max_sequence_length=T5_LENGTH, output_type=output_type).images


def test_sampler_equals_diffusers(folder, pipe):
    """The Euler CFG sampler (``soar.euler.sample_embeds``) on embeddings encoded in diffusers' batches (the
    prompts, then one negative per prompt) = ``StableDiffusion3Pipeline.__call__`` exactly: the final latents
    ``[2, 16, 8, 8]``, the decoded float images ``[2, 3, 64, 64]`` and the uint8 images ``[2, 64, 64, 3]``."""
    bundle = load_bundle(folder, t5_max_length=T5_LENGTH)
    seeds = [image_seed(SEED, i, 0) for i in range(len(PROMPTS))]
    embeds, pooled = bundle.encode_prompts(PROMPTS)
    neg_embeds, neg_pooled = bundle.encode_prompts([""] * len(PROMPTS))
    seen = decode_spy(bundle.codec)
    images = sample_embeds(bundle.transformer, bundle.codec, sampling_sigmas(bundle, STEPS),
                           torch.cat([embeds, neg_embeds]), torch.cat([pooled, neg_pooled]), seeds,
                           guidance_scale=GUIDANCE, resolution=RESOLUTION)
    assert torch.equal(seen["z"], diffusers_images(pipe, seeds, "latent"))
    assert torch.equal((seen["x"] / 2 + 0.5).clamp(0, 1), diffusers_images(pipe, seeds, "pt"))
    reference = np.stack([np.asarray(im) for im in diffusers_images(pipe, seeds, "pil")])
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and np.array_equal(images, reference)
    assert images.std() > 10  # not a blank image


def test_sample_equals_diffusers(folder, pipe):
    """``soar.euler.sample`` (what the sample stage calls) gives diffusers' uint8 images ``[2, 64, 64, 3]`` exactly:
    it encodes the prompts and the N negative prompts in two batches, as diffusers does (the CLIP projections of
    a row depend on the batch's size in the last float32 bits)."""
    bundle = load_bundle(folder, t5_max_length=T5_LENGTH)
    seeds = [image_seed(SEED, i, 0) for i in range(len(PROMPTS))]
    images = sample(bundle, PROMPTS, seeds, steps=STEPS, guidance_scale=GUIDANCE, resolution=RESOLUTION)
    reference = np.stack([np.asarray(im) for im in diffusers_images(pipe, seeds, "pil")])
    assert np.array_equal(images, reference), np.abs(images.astype(int) - reference.astype(int)).max()
