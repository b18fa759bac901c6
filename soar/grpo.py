"""Flow-GRPO's math for rectified-flow models: the SDE step with its log-probability, group-relative advantages,
the PPO clipped objective and the KL term against the frozen reference model.

Pure tensor math (no files, no distributed state); randomness (the step noise ``eps``) comes in as an argument.
States are ``[B, C, H, W]`` (any trailing shape), per-sample scalars ``[B]``. The equations follow Flow-GRPO
(Liu et al., 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"), as its public code computes them:

- SDE step (its Eq. 9, the ``flow_sde`` formula of the SOAR rollout, ``soar.rollout.flow_sde_mean_std``):
  z' ~ N(mean, s²) with s = std sqrt(-dt), std = eta sqrt(sigma / (1 - sigma));
- log-probability of a recorded z' under the current velocity: the Gaussian log-density averaged (not summed)
  over the non-batch dimensions, as the reference code does (so it is a per-dimension figure);
- advantages (its Eq. 4): per prompt group, (r - mean_group) / (std_group + 1e-4), population std; with
  ``global_std`` the std of every reward of the batch instead;
- PPO clipped objective (its Eq. 5): mean over samples of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), the
  advantages clipped to ±``adv_clip_max`` first, ratio = exp(logp - logp_old);
- KL to the reference: mean over dimensions of (mean - mean_ref)² / (2 std²), with std WITHOUT the sqrt(-dt)
  factor, as the reference code computes it: |dt| times the per-dimension Gaussian KL of the two steps (beta
  values from Flow-GRPO's configs keep their meaning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from soar.rollout import flow_sde_mean_std

ADVANTAGE_STD_EPS = 1e-4  # added to the group std before dividing (the reference stat tracker's constant)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class SdeStep:
    """One SDE step: ``z_next [B, ...]``, ``log_prob [B]`` (of ``z_next``), ``mean [B, ...]``, ``std [B, 1, ...]``
    (eta sqrt(sigma / (1 - sigma)), without sqrt(-dt)) and ``scale [B, 1, ...]`` (std sqrt(-dt), the noise's)."""

    z_next: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    scale: torch.Tensor


def sde_step_with_logprob(z: torch.Tensor, v: torch.Tensor, sigma0: torch.Tensor, sigma1: torch.Tensor, eta: float,
                          sigma_cap: float, *, eps: torch.Tensor | None = None,
                          z_next: torch.Tensor | None = None) -> SdeStep:
    """The flow_sde step from ``z`` at ``sigma0`` to ``sigma1`` (< ``sigma0``) with velocity ``v``, and the
    log-probability of its next state: ``z_next`` when given (a recorded step, re-scored under a new ``v``), else
    mean + scale ``eps``. Computed in float32 or wider. ``sigma_cap``: the grid's sigmas[1] (used where sigma0 = 1).

    The density needs noise: eta <= 0 or a step that does not move toward the data (sigma1 >= sigma0) is refused.
    """
    if not eta > 0:
        raise ValueError(f"grpo.noise_level must be > 0 (got {eta}): with no noise the SDE step is the ODE step and "
                         "its log-probability is undefined")
    if not bool((sigma1 < sigma0).all()):
        raise ValueError("sde_step_with_logprob: every sigma1 must be below its sigma0 (a step toward the data)")
    dtype = torch.promote_types(z.dtype, torch.float32)
    mean, std, dt = flow_sde_mean_std(z.to(dtype), v.to(dtype), sigma0.to(dtype), sigma1.to(dtype), eta, sigma_cap)
    scale = std * torch.sqrt(-dt)
    if z_next is None:
        if eps is None:
            raise ValueError("sde_step_with_logprob: give the noise eps (to take a step) or z_next (to score one)")
        z_next = mean + scale * eps.to(dtype)
    log_prob = -((z_next.detach().to(dtype) - mean) ** 2) / (2 * scale**2) - torch.log(scale) - LOG_SQRT_2PI
    return SdeStep(z_next, log_prob.flatten(1).mean(1), mean, std, scale)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, global_std: bool = False) -> torch.Tensor:
    """Group-relative advantages ``[N]`` (float64) of ``rewards [N]``: each minus its group's mean, divided by its
    group's std (or, with ``global_std``, the std of all N rewards) + ``ADVANTAGE_STD_EPS``; ``groups [N]`` ids
    (the prompt of each image). A group whose rewards are all equal gets zeros."""
    r = rewards.to(torch.float64)
    ids, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, r) / count
    centred = r - mean[inverse]
    if global_std:
        std = r.std(unbiased=False).expand_as(r)
    else:
        var = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, centred**2) / count
        std = var.sqrt()[inverse]
    return centred / (std + ADVANTAGE_STD_EPS)


def ppo_clipped_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                     adv_clip_max: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO clipped policy loss over ``[B]`` samples (a scalar to minimise) and its diagnostics: ``clipfrac``
    (share of ratios outside 1 ± clip_range) and ``approx_kl`` (0.5 mean (logp - logp_old)², as the reference logs)."""
    adv = advantages.to(log_prob.dtype).clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {"clipfrac": ((ratio - 1.0).abs() > clip_range).to(log_prob.dtype).mean(),
                 "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean()}
    return loss, stats


def reference_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The KL term (a scalar): mean over samples of mean over dimensions of (mean - mean_ref)² / (2 std²), ``std``
    the step's ``SdeStep.std`` (see the module doc: |dt| times the Gaussian KL per dimension)."""
    per_sample = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std.flatten(1)[:, 0] ** 2)
    return per_sample.mean()
