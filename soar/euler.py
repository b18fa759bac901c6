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

from soar.flow import TIMESTEP_SCALE
from soar.models.bundle import SD3Bundle
from soar.rollout import cfg_velocity, ode_step


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


def weights_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@torch.no_grad()
def denoise(transformer, z: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, sigmas: torch.Tensor,
            guidance_scale: float) -> torch.Tensor:
    """Euler ODE with CFG from ``z [N, C, h, w]`` at sigmas[0] to sigmas[-1]; returns the final latents (fp32).

    ``embeds [2N, L, D]`` / ``pooled [2N, P]``: the N prompts' rows, then the N negative rows; each
    step is ONE transformer forward of 2N rows in the weights' dtype (bf16 weights: bf16 forward),
    z <- z + (sigma_{i+1} - sigma_i) v_cfg with v_cfg = v(c∅) + s (v(c) - v(c∅)) kept in fp32.
    """
    n, device, dtype = z.shape[0], z.device, weights_dtype(transformer)
    embeds, pooled, z = embeds.to(device, dtype), pooled.to(device, dtype), z.float()
    for i in range(len(sigmas) - 1):
        sigma = torch.full((2 * n,), float(sigmas[i]), device=device)
        out = transformer(hidden_states=torch.cat([z, z]).to(dtype), timestep=sigma * TIMESTEP_SCALE,
                          encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        v_cond, v_uncond = out.float().chunk(2)
        z = ode_step(z, cfg_velocity(v_cond, v_uncond, guidance_scale), sigma[:n],
                     torch.full((n,), float(sigmas[i + 1]), device=device))
    return z


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``[N, 3, H, W]`` in [-1, 1] -> uint8 RGB ``[N, H, W, 3]``."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(bundle: SD3Bundle, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: float,
           resolution: int, negative_prompt: str = "") -> np.ndarray:
    """Images for ``prompts`` (one per entry, with the matching seed) as uint8 RGB ``[N, H, W, 3]``.

    The transformer runs in the dtype of its weights (the sample stage casts the bundle to bf16 on a
    GPU); the prompts and the negative prompt are encoded in one call, the N images denoised together.
    """
    transformer = bundle.transformer.eval()
    side = resolution // bundle.codec.downscale
    z = initial_noise(seeds, (bundle.codec.channels, side, side)).to(bundle.device)
    embeds, pooled = bundle.encode_prompts([*prompts, negative_prompt])
    n = len(prompts)
    embeds = torch.cat([embeds[:n], embeds[n:].expand(n, -1, -1)])
    pooled = torch.cat([pooled[:n], pooled[n:].expand(n, -1)])
    z = denoise(transformer, z, embeds, pooled, sampling_sigmas(bundle, steps), guidance_scale)
    return to_uint8(bundle.codec.decode(z))
