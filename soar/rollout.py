"""One-step rollout from an on-path state and the auxiliary points built on it.

The math: docs/method.md#step-3-cfg-rollout and docs/method.md#step-4-auxiliary-points.

All functions are pure tensor math; randomness (noise ``eps``, uniform draws) comes in as
arguments. Per-sample scalars (``sigma0``, ``sigma1``) are ``[B]``; states are ``[B, C, H, W]``.
The step size is dt = sigma1 - sigma0 (< 0 when moving toward the data).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from soar.flow import SigmaSampling, expand_like
from soar.schema import at_least, check

StochasticStep = Callable[..., torch.Tensor]


def ode_step(z: torch.Tensor, v: torch.Tensor, sigma0: torch.Tensor, sigma1: torch.Tensor) -> torch.Tensor:
    """Euler ODE step: z'1 = z + (sigma1 - sigma0) v."""
    return z + expand_like(sigma1 - sigma0, z) * v


def simple_step(z, v, sigma0, sigma1, eps, eta, **_):
    """simple: z' = z + v dt + eta sqrt(|dt|) eps."""
    dt = expand_like(sigma1 - sigma0, z)
    return z + v * dt + eta * dt.abs().sqrt() * eps


def sde_step(z, v, sigma0, sigma1, eps, eta, **_):
    """sde: x̂0 = z - sigma0 v; z' = (1 - sigma1) x̂0 + sigma1 eps (re-noise to sigma1; eta unused)."""
    s0, s1 = expand_like(sigma0, z), expand_like(sigma1, z)
    x0_hat = z - s0 * v
    return (1 - s1) * x0_hat + s1 * eps


def flow_sde_mean_std(z, v, sigma0, sigma1, eta, sigma_cap: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flow_sde step's mean, ``std`` and ``dt`` (the last two ``[B, 1, ...]``, broadcasting like ``z``).

    std = eta sqrt(sigma0 / (1 - s0)), s0 = sigma0 except ``sigma_cap`` (the grid's sigmas[1]) where sigma0 == 1;
    mean = z (1 + std²/(2 sigma0) dt) + v (1 + std² (1 - sigma0)/(2 sigma0)) dt. The step's noise has standard
    deviation std sqrt(-dt) (``soar.grpo`` reads its density).
    """
    s0 = torch.where(sigma0 >= 1, torch.full_like(sigma0, sigma_cap), sigma0)
    std = expand_like(eta * torch.sqrt(sigma0 / (1 - s0)), z)
    sg, dt = expand_like(sigma0, z), expand_like(sigma1 - sigma0, z)
    mean = z * (1 + std**2 / (2 * sg) * dt) + v * (1 + std**2 * (1 - sg) / (2 * sg)) * dt
    return mean, std, dt


def flow_sde_step(z, v, sigma0, sigma1, eps, eta, sigma_cap: float, **_):
    """flow_sde (Flow-GRPO SDE): z' = mean + std sqrt(-dt) eps (``flow_sde_mean_std``)."""
    mean, std, dt = flow_sde_mean_std(z, v, sigma0, sigma1, eta, sigma_cap)
    return mean + std * torch.sqrt((-dt).clamp_min(0)) * eps


def cps_step(z, v, sigma0, sigma1, eps, eta, **_):
    """cps (coefficient-preserving): std = sigma1 sin(eta pi/2); x̂0 = z - sigma0 v; x̂1 = z + (1 - sigma0) v;

    z' = (1 - sigma1) x̂0 + sqrt(sigma1² - std²) x̂1 + std eps.
    """
    s0, s1 = expand_like(sigma0, z), expand_like(sigma1, z)
    std = s1 * math.sin(eta * math.pi / 2)
    x0_hat, x1_hat = z - s0 * v, z + (1 - s0) * v
    return (1 - s1) * x0_hat + torch.sqrt((s1**2 - std**2).clamp_min(0)) * x1_hat + std * eps


STOCHASTIC_STEPS: dict[str, StochasticStep] = {
    "simple": simple_step, "sde": sde_step, "flow_sde": flow_sde_step, "cps": cps_step,
}


RolloutType = Literal[tuple(STOCHASTIC_STEPS)]  # the names ``soar.sde_rollout_type`` accepts


def stochastic_step(kind: str) -> StochasticStep:
    """Resolve the stochastic rollout formula once (not per step)."""
    if kind not in STOCHASTIC_STEPS:
        raise ValueError(f"soar.sde_rollout_type: unknown {kind!r} (known: {', '.join(STOCHASTIC_STEPS)})")
    return STOCHASTIC_STEPS[kind]


def sigma_upper(sigma0: torch.Tensor, ratio: float | None) -> torch.Tensor:
    """Upper end of the auxiliary sigma range: 1 (ratio None, as released) or min(ratio sigma0, 1)."""
    if ratio is None:
        return torch.ones_like(sigma0)
    return (ratio * sigma0).clamp(max=1.0)


def aux_sigmas(sigma1: torch.Tensor, upper: torch.Tensor, u: torch.Tensor, sigma_floor: float) -> torch.Tensor:
    """sigma' = lo + u (hi - lo), lo = max(sigma1, sigma_floor), hi = max(upper, lo); ``u [B, T]`` ~ U[0, 1).

    ``sigma_floor`` (the grid's smallest non-zero sigma) keeps v_corr = (z' - z0)/sigma' finite
    when the rollout reached sigma1 = 0.
    """
    lo = sigma1.clamp(min=sigma_floor)[:, None]
    hi = torch.maximum(upper[:, None], lo)
    return lo + u * (hi - lo)


def aux_points(z_rolled: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor, sigma1: torch.Tensor,
               sigma_aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Auxiliary states and correction targets for one rollout path.

    ``z_rolled, z0, z1 [B, ...]``, ``sigma1 [B]``, ``sigma_aux [B, T]`` ->
    ``z_aux [B, T, ...]`` and ``v_corr [B, T, ...]``:
    alpha = (sigma' - sigma1)/(1 - sigma1); z_sigma' = (1 - alpha) z'1 + alpha z1 (toward the SAME z1);
    v_corr = (z_sigma' - z0)/sigma'.
    """
    shape = sigma_aux.shape + (1,) * (z0.ndim - 1)
    s1 = sigma1[:, None].expand_as(sigma_aux)
    alpha = ((sigma_aux - s1) / (1 - s1).clamp_min(torch.finfo(s1.dtype).eps)).reshape(shape)
    z_aux = (1 - alpha) * z_rolled[:, None] + alpha * z1[:, None]
    v_corr = (z_aux - z0[:, None]) / sigma_aux.reshape(shape)
    return z_aux, v_corr


@dataclass(frozen=True)
class SoarConfig:
    """The ``soar`` section: the self-correction rollout and its auxiliary loss (docs/method.md)."""

    lambda_aux: float = 1.0  # weight of the auxiliary (self-correction) loss; 0 = SFT
    num_rollout_paths: int = 1  # M: one ODE path plus M - 1 stochastic paths
    trajectory_length: int = 6  # auxiliary points per rollout path (T)
    num_sampling_steps: int = 40  # sampler steps the rollout step size is taken from (1/N in t)
    sde_rollout_type: RolloutType = "flow_sde"  # stochastic path formula
    sde_noise_scale: float = 0.5  # noise scale eta of the stochastic paths
    cfg_scale_sampling: float = 4.5  # CFG scale of the rollout velocity
    sigma_upper_ratio: float | None = None  # null: sigma' ~ U[sigma1, 1] (paper); r: U[sigma1, min(r*sigma0, 1)]
    aux_microbatch: int | None = None  # split main+aux forward into chunks of this many points (null = one)
    sigma_sampling: SigmaSampling = "grid"  # main/rollout sigmas: scheduler grid (paper) or shift(u)

    def __post_init__(self) -> None:
        check(self.lambda_aux >= 0, "lambda_aux", "must be >= 0")
        check(self.num_rollout_paths >= 1, "num_rollout_paths", "must be >= 1")
        check(self.trajectory_length >= 0, "trajectory_length", "must be >= 0")
        check(self.num_sampling_steps >= 1, "num_sampling_steps", "must be >= 1")
        check(self.sde_noise_scale >= 0, "sde_noise_scale", "must be >= 0")
        check(self.sigma_upper_ratio is None or self.sigma_upper_ratio >= 1, "sigma_upper_ratio",
              "must be null or >= 1 (below 1, r*sigma0 can fall under sigma1 and the range would be empty)")
        check(self.aux_microbatch is None or self.aux_microbatch >= 1, "aux_microbatch", "must be null or >= 1")
        at_least(self, 0, "cfg_scale_sampling")
