"""VAE latent cache: training from cached posterior moments equals encoding the pixels every step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, SD3Transformer2DModel
from helpers import train_config, write_tiny_training_world
from test_checkpoint import LOOP, RECORDS, SOAR, load

from soar.latent_cache import LatentCache, codec_key
from soar.models.bundle import load_bundle
from soar.trainer import train

PLAIN = dict(gradient_accumulation_steps=1, max_train_steps=3, checkpointing_steps=0, ema_decay=None,
             resume_from_checkpoint=None)


def write_vae_model(pixel_model: Path, out: Path) -> Path:
    """The tiny model folder with a real (tiny, random) AutoencoderKL instead of the pixel codec."""
    shutil.copytree(pixel_model, out, ignore=shutil.ignore_patterns("codec", "transformer"))
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, shift_factor=0.1, scaling_factor=1.5)
    vae.save_pretrained(out / "vae")
    config = SD3Transformer2DModel.load_config(pixel_model / "transformer")
    transformer = SD3Transformer2DModel.from_config({**config, "in_channels": 4, "out_channels": 4, "sample_size": 8,
                                                      "patch_size": 2, "pos_embed_max_size": 4})
    transformer.save_pretrained(out / "transformer")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("latent_world")
    model_dir, image_dir, _ = write_tiny_training_world(root)
    return write_vae_model(model_dir, root / "vae_model"), image_dir


def run(model_dir: Path, image_dir: Path, out: Path, latents: LatentCache | None) -> dict:
    loop = train_config(**{**LOOP, **PLAIN})
    accelerator = Accelerator(cpu=True)
    return train(load_bundle(model_dir), RECORDS, image_dir, loop, SOAR, out, accelerator, lambda m, s: None,
                 latents=latents)


def test_cached_moments_give_the_same_training_as_encoding_pixels(world, tmp_path):
    model_dir, image_dir = world
    cache = LatentCache(tmp_path / "latents", codec_key(model_dir))
    run(model_dir, image_dir, tmp_path / "encoded", None)
    run(model_dir, image_dir, tmp_path / "cached", cache)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    encoded, cached = load(tmp_path / "encoded" / weights), load(tmp_path / "cached" / weights)
    assert encoded.keys() == cached.keys()
    for k in encoded:  # equal up to the VAE's float rounding, which depends on the batch an image shares
        torch.testing.assert_close(cached[k], encoded[k], rtol=0, atol=1e-6)
    base = load(model_dir / weights)
    assert max((cached[k] - base[k]).abs().max() for k in base) > 1e-4  # and training did move the weights
    assert cache.missing(RECORDS) == []
    mean, std = cache.load(RECORDS[0])
    assert mean.shape == std.shape == (4, 8, 8) and (std > 0).all()  # a real posterior, C x H/2 x W/2


def test_cache_is_built_once_and_keyed_by_the_codec(world, tmp_path):
    model_dir, image_dir = world
    cache = LatentCache(tmp_path / "latents", codec_key(model_dir))
    run(model_dir, image_dir, tmp_path / "a", cache)
    stamps = {p: p.stat().st_mtime_ns for p in cache.dir.iterdir()}
    assert len(stamps) == len({r.md5 for r in RECORDS})
    run(model_dir, image_dir, tmp_path / "b", cache)  # second run: nothing re-encoded
    assert {p: p.stat().st_mtime_ns for p in cache.dir.iterdir()} == stamps
    other = tmp_path / "other_vae"
    shutil.copytree(model_dir, other)
    vae = AutoencoderKL.from_pretrained(other / "vae")
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    vae.save_pretrained(other / "vae")
    assert codec_key(other) != codec_key(model_dir)  # a changed VAE never reads these latents


def test_missing_entry_names_the_file_and_image(world, tmp_path):
    cache = LatentCache(tmp_path / "latents", codec_key(world[0]))
    with pytest.raises(FileNotFoundError, match=f"{RECORDS[0].md5}.*line"):
        cache.load(RECORDS[0])
