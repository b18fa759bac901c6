"""Deterministic per-image sampling with the Euler flow sampler and CFG.

Every image is a function of (model, prompt, seed) alone in distribution: its initial noise comes
from its own CPU generator seeded by ``image_seed(base, prompt_index, image_index)``, so no image
depends on which other images share its batch, on batch order, or on how many processes made the set.
Several prompts go through one forward; cond and uncond share it (CFG doubles the batch).

Bit for bit, an image depends on the batch shape of its forwards (``tests/test_sampling_dist.py``,
``test_batch_size_changes_no_image``), so the stage fixes each batch's composition (``stages.sample``):
the bytes then depend neither on the number of processes nor on resuming.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from soar.models.bundle import SD3Bundle
from soar.rollout import ode_step
from soar.velocity import Velocity, transformer_velocity, with_cfg


def image_seed(base: int, prompt_index: int, image_index: int) -> int:
    """A stable 63-bit seed per (base seed, prompt index, image index)."""
    state = np.random.SeedSequence([base, prompt_index, image_index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def sampling_sigmas(bundle: SD3Bundle, steps: int) -> torch.Tensor:
    """Shifted sigmas ``[steps + 1]`` from 1 to 0, as ``FlowMatchEulerDiscreteScheduler.set_timesteps``."""
    scheduler = bundle.scheduler
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double().cpu()


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """``z1 [N, *shape]``: one standard normal draw per seed, each from its own CPU generator."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def denoise(velocity: Velocity, z: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor,
            pooled: torch.Tensor) -> torch.Tensor:
    """Euler ODE from ``z [N, C, h, w]`` at sigmas[0] to sigmas[-1]; returns the final latents (float32 or wider).

    Each step z <- z + (sigma_{i+1} - sigma_i) velocity(z, sigma_i, embeds, pooled)
    (docs/method.md#notation-and-the-timestep-convention), sigma_i a float32 ``[N]`` on z's device;
    ``embeds [N, L, D]`` / ``pooled [N, P]``. With a ``soar.velocity.with_cfg`` velocity every step is
    ONE transformer forward of 2N rows.
    """
    n, device = z.shape[0], z.device
    z = z.float()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = (torch.full((n,), float(s), device=device) for s in sigmas[i:i + 2])
        z = ode_step(z, velocity(z, sigma, embeds, pooled), sigma, sigma_next)
    return z


class NonFiniteImages(FloatingPointError):
    """Decoded images holding NaN or infinity; ``indices``: which images of the batch."""

    def __init__(self, indices: list[int]):
        super().__init__(f"images {indices} hold NaN or infinity")
        self.indices = indices


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``[N, 3, H, W]`` in [-1, 1] -> uint8 RGB ``[N, H, W, 3]``."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_embeds(transformer, codec, sigmas: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                  seeds: Sequence[int], *, guidance_scale: float, resolution: int) -> np.ndarray:
    """Images for N prompts given as text embeddings, uint8 RGB ``[N, H, W, 3]``.

    ``embeds [N + R, L, D]`` / ``pooled [N + R, P]``: the N prompts' rows, then the negative prompt's, once
    (R = 1) or once per image (R = N, ``sample``);
    image i starts from the noise of ``seeds[i]``; ``sigmas [S + 1]``: the schedule (``sampling_sigmas``).
    The transformer runs in eval mode on its device, in the dtype of its weights (the sample stage casts
    the transformer and codec to bf16 on a GPU), with CFG (``soar.velocity.with_cfg``); ``codec`` decodes.
    """
    param = next(transformer.parameters())
    device, dtype, n = param.device, param.dtype, len(seeds)
    side = resolution // codec.downscale
    z = initial_noise(seeds, (codec.channels, side, side)).to(device)
    embeds, pooled = embeds.to(device, dtype), pooled.to(device, dtype)
    velocity = with_cfg(transformer_velocity(transformer.eval(), cast_inputs=True), guidance_scale, embeds[n:],
                        pooled[n:])
    images = codec.decode(denoise(velocity, z, sigmas, embeds[:n], pooled[:n]))
    bad = (~torch.isfinite(images.flatten(1)).all(dim=1)).nonzero().flatten().tolist()
    if bad:  # NaN would be written as black pixels (uint8 of NaN), infinity as white ones
        raise NonFiniteImages(bad)
    return to_uint8(images)


@torch.no_grad()
def sample(bundle: SD3Bundle, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: float,
           resolution: int, negative_prompt: str = "") -> np.ndarray:
    """Images for ``prompts`` (one per entry, with the matching seed) as uint8 RGB ``[N, H, W, 3]``.

    The N prompts are encoded in one call and the negative prompt, N times, in another, as diffusers'
    ``StableDiffusion3Pipeline.encode_prompt`` does (a text encoder's output rows depend on the batch in the last
    float bits, so this is what makes the images equal the pipeline's bit for bit); the N images are denoised
    together (``sample_embeds``).
    """
    embeds, pooled = bundle.encode_prompts(list(prompts))
    neg_embeds, neg_pooled = bundle.encode_prompts([negative_prompt] * len(prompts))
    try:
        return sample_embeds(bundle.transformer, bundle.codec, sampling_sigmas(bundle, steps),
                             torch.cat([embeds, neg_embeds]), torch.cat([pooled, neg_pooled]), seeds,
                             guidance_scale=guidance_scale, resolution=resolution)
    except NonFiniteImages as err:
        i = err.indices[0]
        raise FloatingPointError(f"{len(err.indices)} of {len(prompts)} image(s) came out NaN or infinite, first "
                                 f"for prompt {prompts[i]!r} (seed {seeds[i]}); nothing of this batch is "
                                 "saved") from None
