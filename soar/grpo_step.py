"""Flow-GRPO's two model-facing pieces: SDE trajectories with their log-probabilities, and one training step's loss.

Pure tensor code around a ``soar.velocity.Velocity`` (no files, no process groups); the noise comes in as an
argument. The math is ``soar.grpo`` (docs/method.md, "Flow-GRPO"). Shapes: states ``[B, C, H, W]``,
trajectories ``[B, S + 1, C, H, W]``, per-step log-probabilities ``[B, S]``, sigmas ``[S + 1]`` from 1 to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soar.flow import at_least_f32
from soar.grpo import ppo_clipped_loss, reference_kl, sde_step_with_logprob
from soar.velocity import Velocity


@dataclass(frozen=True)
class Trajectories:
    """``latents [B, S + 1, C, H, W]`` (z at sigmas[0..S], float32 or wider), ``log_probs [B, S]`` of each step's z'."""

    latents: torch.Tensor
    log_probs: torch.Tensor


@torch.no_grad()
def sde_trajectories(velocity: Velocity, z1: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor,
                     pooled: torch.Tensor, eta: float, eps: torch.Tensor) -> Trajectories:
    """Sample with the flow_sde step from ``z1 [B, C, H, W]`` along ``sigmas [S + 1]`` (1 -> 0), recording states
    and log-probabilities (Flow-GRPO's ``pipeline_with_logprob``): step i goes sigmas[i] -> sigmas[i + 1] with
    the noise ``eps[:, i]`` (``eps [B, S, C, H, W]``); every step, the last included, is stochastic.
    ``velocity`` is the guided one (``soar.velocity.with_cfg``); ``embeds [B, L, D]``, ``pooled [B, P]``."""
    n, steps = z1.shape[0], len(sigmas) - 1
    if eps.shape[:2] != (n, steps) or eps.shape[2:] != z1.shape[1:]:
        raise ValueError(f"sde_trajectories: eps {tuple(eps.shape)} must be [B, S, ...] = "
                         f"{(n, steps, *z1.shape[1:])}")
    z, cap = at_least_f32(z1), float(sigmas[1])
    latents, log_probs = [z], []
    for i in range(steps):
        sigma0, sigma1 = (torch.full((n,), float(s), device=z.device) for s in sigmas[i:i + 2])
        step = sde_step_with_logprob(z, velocity(z, sigma0, embeds, pooled), sigma0, sigma1, eta, cap,
                                     eps=eps[:, i].to(z.device))
        z = step.z_next
        latents.append(z)
        log_probs.append(step.log_prob)
    return Trajectories(torch.stack(latents, 1), torch.stack(log_probs, 1))


@dataclass(frozen=True)
class GrpoStepSettings:
    """What one loss evaluation needs: the sampler's ``eta`` and grid cap (sigmas[1]), the PPO clip, advantage clip
    and KL weight ``beta``."""

    eta: float
    sigma_cap: float
    clip_range: float
    adv_clip_max: float
    beta: float


def grpo_loss(velocity: Velocity, reference: Velocity | None, z: torch.Tensor, z_next: torch.Tensor,
              old_log_prob: torch.Tensor, advantages: torch.Tensor, sigma0: torch.Tensor, sigma1: torch.Tensor,
              embeds: torch.Tensor, pooled: torch.Tensor, s: GrpoStepSettings
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One sampler step's loss for ``B`` recorded transitions ``z [B, ...] -> z_next [B, ...]`` (sigma0 -> sigma1,
    ``[B]``): the PPO clipped objective on the log-probability of ``z_next`` under ``velocity`` (Flow-GRPO Eq. 5)
    against ``old_log_prob [B]`` with ``advantages [B]``, plus ``beta`` times the KL to ``reference`` (the frozen
    starting model's velocity, no gradient; None when beta is 0). Both velocities are guided (CFG).
    Returns the loss (a mean over the B transitions) and diagnostics ``policy_loss``, ``kl``, ``clipfrac``,
    ``approx_kl``."""
    step = sde_step_with_logprob(z, velocity(z, sigma0, embeds, pooled), sigma0, sigma1, s.eta, s.sigma_cap,
                                 z_next=z_next)
    policy, stats = ppo_clipped_loss(step.log_prob, old_log_prob, advantages, s.clip_range, s.adv_clip_max)
    stats = {"policy_loss": policy.detach(), **stats}
    if s.beta == 0:
        return policy, stats
    if reference is None:
        raise ValueError("grpo_loss: beta > 0 needs the reference velocity")
    with torch.no_grad():
        ref = sde_step_with_logprob(z, reference(z, sigma0, embeds, pooled), sigma0, sigma1, s.eta, s.sigma_cap,
                                    z_next=z_next)
    kl = reference_kl(step.mean, ref.mean, step.std)
    stats["kl"] = kl.detach()
    return policy + s.beta * kl, stats

