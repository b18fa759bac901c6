"""Tiny random model folders laid out exactly like the diffusers folders of SD-XL and FLUX.1-dev.

Each writer builds the family's components with the real diffusers/transformers classes at a tiny size and saves them
with the family pipeline's own ``save_pretrained``, so that ``<Pipeline>.from_pretrained`` loads the folder as it
loads the released one. The tokenizers and text encoders are those of ``sd35_layout`` (the real 49408-entry CLIP BPE
vocabulary, ``model_max_length`` 77; a small T5 Unigram vocabulary); for SD3 use ``sd35_layout.write_sd35_folder``.

``write_sdxl_folder`` (StableDiffusionXLPipeline, float32 weights as the released main files):

    model_index.json   force_zeros_for_empty_prompt true, as released
    scheduler/         EulerDiscreteScheduler: scaled_linear betas 0.00085 -> 0.012, steps_offset 1, "leading" spacing
    unet/              UNet2DConditionModel, addition_embed_type "text_time": a DownBlock2D then a CrossAttnDownBlock2D
                       (channels 8, 16; 2 and 4 heads; 1 and 2 transformer layers); cross_attention_dim = CLIP-L hidden
                       + CLIP-G hidden, projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + CLIP-G
                       projection (the six size/crop numbers of ``_get_add_time_ids`` and the pooled CLIP-G vector)
    vae/               AutoencoderKL: 4 blocks (factor 8), 4 latent channels, scaling factor 0.13025, quant convs
    text_encoder/      CLIP-L as CLIPTextModel,                  tokenizer/   its CLIPTokenizer (pads with EOT)
    text_encoder_2/    CLIP-G as CLIPTextModelWithProjection,    tokenizer_2/ its CLIPTokenizer (pads with "!")

``write_flux_folder`` (FluxPipeline, bfloat16 weights as released):

    model_index.json
    scheduler/         FlowMatchEulerDiscreteScheduler as FLUX.1-dev's: shift 3.0, dynamic shifting (mu from the image
                       token count, base_shift 0.5 at 256 tokens to max_shift 1.15 at 4096)
    transformer/       FluxTransformer2DModel, guidance_embeds true: 1 double-stream and 1 single-stream block,
                       2 heads x 16 (RoPE axes 4, 6, 6), in_channels 4 * 16 (2x2-packed latents), joint_attention_dim
                       = T5 width, pooled_projection_dim = CLIP-L hidden (FLUX pools CLIPTextModel's pooler_output)
    vae/               AutoencoderKL: 4 blocks (factor 8), 16 latent channels, FLUX's scaling 0.3611 and shift 0.1159,
                       no quant convs
    text_encoder/      CLIP-L as CLIPTextModel,   tokenizer/   its CLIPTokenizer (pads with EOT)
    text_encoder_2/    T5EncoderModel,            tokenizer_2/ T5TokenizerFast

Image sides are multiples of 8 px (SD-XL) and 16 px (FLUX: the VAE's 8 times the 2x2 packing).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sd35_layout import (
    CLIP_G_HIDDEN,
    CLIP_G_PROJ,
    CLIP_L_HIDDEN,
    CLIP_L_PROJ,
    CLIP_MAX_LENGTH,
    CLIP_PAD_TOKENS,
    SCHEDULER_SHIFT,
    T5_WIDTH,
    _clip_encoder,
    _t5_encoder,
    clip_bpe_vocabulary,
    t5_tokenizer,
    write_clip_tokenizer,
)

SDXL_LATENT_CHANNELS, SDXL_SCALING_FACTOR = 4, 0.13025
SDXL_TIME_EMBED_DIM = 8  # SD-XL: 256 per size/crop number
SDXL_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                  "timestep_spacing": "leading", "prediction_type": "epsilon", "num_train_timesteps": 1000}
FLUX_LATENT_CHANNELS, FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR = 16, 0.3611, 0.1159
FLUX_SCHEDULER = {"shift": SCHEDULER_SHIFT, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096, "num_train_timesteps": 1000}
CLIP_L_ACT, CLIP_G_ACT = "quick_gelu", "gelu"


def _clip_text_model(hidden: int, seed: int):
    """CLIP-L as ``CLIPTextModel`` (no projection): the text tower of ``sd35_layout``'s CLIP-L encoder."""
    from transformers import CLIPTextModel

    with_projection = _clip_encoder(hidden, CLIP_L_PROJ, CLIP_L_ACT, seed)
    model = CLIPTextModel(with_projection.config).eval()
    model.load_state_dict(with_projection.text_model.state_dict())
    return model


def _autoencoder(latent_channels: int, scaling_factor: float, shift_factor: float | None, quant_convs: bool,
                 seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=64,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=quant_convs,
                         use_post_quant_conv=quant_convs, force_upcast=True)


def _sdxl_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=SDXL_LATENT_CHANNELS, out_channels=SDXL_LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=CLIP_L_HIDDEN + CLIP_G_HIDDEN, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + CLIP_G_PROJ)


def _flux_transformer(seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * FLUX_LATENT_CHANNELS, num_layers=1,
                                  num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_L_HIDDEN,
                                  guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _clip_tokenizer(pad: str):
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=CLIP_MAX_LENGTH)


def _released_clip_tokenizers(path: Path, names: dict[str, str]) -> None:
    """Replace the saved CLIP tokenizer folders ``{folder: pad token}`` by the released files."""
    for name, pad in names.items():
        for file in (path / name).iterdir():
            file.unlink()
        write_clip_tokenizer(path / name, pad)


def write_sdxl_folder(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny SD-XL-layout folder (random float32 weights from ``seed``) at ``path``; returns it.

    The caller's global torch RNG state is left as it was.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        pipe = StableDiffusionXLPipeline(
            vae=_autoencoder(SDXL_LATENT_CHANNELS, SDXL_SCALING_FACTOR, None, True, seed + 1),
            text_encoder=_clip_text_model(CLIP_L_HIDDEN, seed + 2),
            text_encoder_2=_clip_encoder(CLIP_G_HIDDEN, CLIP_G_PROJ, CLIP_G_ACT, seed + 3),
            tokenizer=_clip_tokenizer(CLIP_PAD_TOKENS["tokenizer"]),
            tokenizer_2=_clip_tokenizer(CLIP_PAD_TOKENS["tokenizer_2"]),
            unet=_sdxl_unet(seed), scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False)
    pipe.save_pretrained(path)
    _released_clip_tokenizers(path, CLIP_PAD_TOKENS)
    return path


def write_flux_folder(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny FLUX.1-dev-layout folder (random bfloat16 weights from ``seed``) at ``path``; returns it.

    The caller's global torch RNG state is left as it was.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    path = Path(path)
    t5_tok = t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
            vae=_autoencoder(FLUX_LATENT_CHANNELS, FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR, False, seed + 1),
            text_encoder=_clip_text_model(CLIP_L_HIDDEN, seed + 2),
            tokenizer=_clip_tokenizer(CLIP_PAD_TOKENS["tokenizer"]),
            text_encoder_2=_t5_encoder(len(t5_tok), seed + 4), tokenizer_2=t5_tok, transformer=_flux_transformer(seed))
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(path)
    _released_clip_tokenizers(path, {"tokenizer": CLIP_PAD_TOKENS["tokenizer"]})
    model_index = json.loads((path / "model_index.json").read_text())
    model_index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]  # as released (an alias in transformers 5)
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    return path
