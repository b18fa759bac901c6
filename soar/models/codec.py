"""Codecs between images in [-1, 1] and the latents z0 the flow works on.

SD3 convention: z0 = (vae.encode(x).sample() - shift_factor) * scaling_factor
(docs/method.md#notation-and-the-timestep-convention).
``moments`` gives the latent distribution in z0 units (mean, std) and ``sample_moments`` draws z0 from
it; ``encode`` is exactly their composition, so a latent cache of moments (``soar.latent_cache``)
reproduces the uncached draws bit for bit.
``PixelCodec`` is the tiny profile's explicit identity codec (z0 = x); ``VaeCodec`` wraps a
diffusers ``AutoencoderKL`` as found in an SD3.5 folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PIXEL_CODEC_TYPE = "pixel"


class PixelCodec:
    """Identity codec: the latent is the RGB image itself, ``[B, 3, H, W]`` in [-1, 1]."""

    channels = 3
    downscale = 1

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x [B, 3, H, W]`` in [-1, 1] -> ``z0 [B, 3, H, W]``."""
        return x

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, 3, H, W]`` -> ``(mean, std)``, both ``[B, 3, H, W]``: a point mass at x."""
        return x.float(), torch.zeros_like(x, dtype=torch.float32)

    def sample_moments(self, mean: torch.Tensor, std: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """The latent itself (no draw, like ``encode``)."""
        return mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, 3, H, W]`` -> image ``[B, 3, H, W]`` in [-1, 1] (clamped)."""
        return z.clamp(-1, 1)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"type": PIXEL_CODEC_TYPE, "channels": self.channels}))

    def to(self, *args, **kwargs) -> PixelCodec:
        return self


class VaeCodec:
    """SD3 latents from an ``AutoencoderKL`` with ``shift_factor`` and ``scaling_factor``."""

    def __init__(self, vae) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.channels = vae.config.latent_channels
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.shift = vae.config.shift_factor or 0.0
        self.scale = vae.config.scaling_factor

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x [B, 3, H, W]`` in [-1, 1] -> ``z0 [B, C, H/8, W/8]``, a draw from the posterior."""
        return self.sample_moments(*self.moments(x), generator=generator)

    @torch.no_grad()
    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, 3, H, W]`` -> posterior ``(mean, std)`` in z0 units, float32 ``[B, C, H/8, W/8]``."""
        dist = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist
        return ((dist.mean.float() - self.shift) * self.scale), dist.std.float() * self.scale

    def sample_moments(self, mean: torch.Tensor, std: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """``z0 = mean + std * eps``, eps ~ N(0, I) from ``generator`` (``[B, C, h, w]``)."""
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32).to(mean.device)
        return mean.float() + std.float() * eps

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, C, h, w]`` -> image ``[B, 3, 8h, 8w]`` in [-1, 1]."""
        z = (z / self.scale + self.shift).to(self.vae.device, self.vae.dtype)
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    def to(self, *args, **kwargs) -> VaeCodec:
        self.vae.to(*args, **kwargs)
        return self
