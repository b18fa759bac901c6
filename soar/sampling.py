"""Deterministic per-image sampling with the Euler flow sampler and CFG.

Every image is a pure function of (model, prompt, seed): its initial noise comes from its own
generator seeded by ``image_seed(base, prompt_index, image_index)``, so the set of images does
not depend on batch composition order or on how many processes made it. Several prompts go
through one forward; cond and uncond share it (CFG doubles the batch).
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


@torch.no_grad()
def sample(bundle: SD3Bundle, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: float,
           resolution: int, negative_prompt: str = "", dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Images for ``prompts`` (one per entry, with the matching seed) as uint8 RGB ``[N, H, W, 3]``.

    Euler steps z <- z + (sigma_{i+1} - sigma_i) v_cfg with v_cfg = v(c∅) + s (v(c) - v(c∅)).
    """
    device = bundle.device
    side = resolution // bundle.codec.downscale
    z = initial_noise(seeds, (bundle.codec.channels, side, side)).to(device)
    embeds, pooled = bundle.encode_prompts([*prompts, negative_prompt])
    n = len(prompts)
    embeds = torch.cat([embeds[:n], embeds[n:].expand(n, -1, -1)]).to(dtype)
    pooled = torch.cat([pooled[:n], pooled[n:].expand(n, -1)]).to(dtype)
    sigmas = sampling_sigmas(bundle, steps)
    transformer = bundle.transformer.eval()
    for i in range(steps):
        sigma = torch.full((2 * n,), float(sigmas[i]), device=device)
        out = transformer(hidden_states=torch.cat([z, z]).to(dtype), timestep=sigma * TIMESTEP_SCALE,
                          encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        v_cond, v_uncond = out.float().chunk(2)
        z = ode_step(z, cfg_velocity(v_cond, v_uncond, guidance_scale),
                     torch.full((n,), float(sigmas[i]), device=device),
                     torch.full((n,), float(sigmas[i + 1]), device=device))
    images = bundle.codec.decode(z)
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
