"""Rectified-flow basics in the SD3 convention (docs/method.md#notation-and-the-timestep-convention).

z_sigma = (1 - sigma) * z0 + sigma * z1, sigma in [0, 1]; true velocity v* = z1 - z0; the
model's timestep input is ``sigma * TIMESTEP_SCALE`` for every point (main and auxiliary).
Timestep densities and loss weights follow diffusers' SD3 training helpers
(``compute_density_for_timestep_sampling``, ``compute_loss_weighting_for_sd3``): one key,
``weighting_scheme``, picks both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from soar.schema import check, positive

TIMESTEP_SCALE = 1000.0  # SD3: timestep = sigma * 1000 (num_train_timesteps)
# Timestep densities (``sample_t``) and loss weights (``loss_weight``), one name picking both as in SD3 training.
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")
WeightingScheme = Literal[WEIGHTING_SCHEMES]
SIGMA_SAMPLINGS = ("grid", "continuous")  # how ``sigma_at`` maps times to sigmas
SigmaSampling = Literal[SIGMA_SAMPLINGS]


def expand_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values ``[B]`` to broadcast against ``ref [B, ...]``."""
    return x.reshape(x.shape + (1,) * (ref.ndim - x.ndim))


def interpolate(z0: torch.Tensor, z1: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z_sigma = (1 - sigma) z0 + sigma z1; ``z0, z1 [B, ...]``, ``sigma [B]``."""
    s = expand_like(sigma, z0)
    return (1 - s) * z0 + s * z1


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift: sigma = shift * t / (1 + (shift - 1) * t)."""
    return shift * t / (1 + (shift - 1) * t)


def sigma_grid(num_train_timesteps: int, shift: float, dtype=torch.float64) -> torch.Tensor:
    """The scheduler's training sigmas ``[N + 1]``: shifted linspace(1, 1/N, N), then a final 0.

    Equals ``FlowMatchEulerDiscreteScheduler(N, shift=shift).sigmas`` with the terminal 0 the
    sampler appends; index 0 is sigma = 1.
    """
    t = torch.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps, dtype=dtype)
    return torch.cat([shift_sigma(t, shift), torch.zeros(1, dtype=dtype)])


def sigma_from_t(t: torch.Tensor, grid: torch.Tensor, allow_zero: bool) -> torch.Tensor:
    """Map times ``t [B]`` in [0, 1] to grid sigmas (grid dtype): index floor((1 - t) N), clamped.

    Main points (``allow_zero=False``) use indices 0..N-1; rollout targets (``allow_zero=True``)
    may reach index N, the terminal sigma 0, exactly when t = 0.
    """
    n = grid.numel() - 1
    idx = torch.floor((1 - t.double()) * n).long().clamp(0, n if allow_zero else n - 1)
    return grid.to(t.device)[idx]


def sigma_at(t: torch.Tensor, grid: torch.Tensor, *, allow_zero: bool, sampling: str = "grid",
             shift: float | None = None) -> torch.Tensor:
    """Sigmas ``[B]`` (grid dtype) for times ``t [B]`` (float64): the one place main and target sigmas are drawn.

    ``sampling="grid"``: the scheduler's grid (``sigma_from_t``, as the released code and the paper);
    ``"continuous"``: sigma = shift_sigma(t, shift) with the scheduler's shift (SD3 training without
    a grid), which is 0 exactly at t = 0, so ``allow_zero`` needs no special case there.
    """
    if sampling == "grid":
        return sigma_from_t(t, grid, allow_zero)
    if sampling != "continuous":
        raise ValueError(f"sigma_sampling: unknown {sampling!r} (known: grid, continuous)")
    if shift is None:
        raise ValueError("sigma_sampling=continuous needs the scheduler's shift")
    return shift_sigma(t.double(), shift).to(device=grid.device, dtype=grid.dtype)


def sample_t(scheme: str, batch: int, generator: torch.Generator, *, logit_mean: float, logit_std: float,
             mode_scale: float, device=None) -> torch.Tensor:
    """Draw training times ``u [batch]`` (float64) in (0, 1) from the density of ``scheme``.

    logit_normal: u = sigmoid(N(logit_mean, logit_std)); mode: u = 1 - v - mode_scale (cos²(pi v/2) - 1 + v),
    v ~ U(0, 1) (SD3 eq. for the "mode" density); anything else: uniform.
    """
    if scheme == "logit_normal":
        normal = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
        return torch.sigmoid(logit_mean + logit_std * normal)
    v = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    if scheme == "mode":
        v = 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    return v


def at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 when it already is (update arithmetic never in bf16/fp16)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def loss_weight(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """Per-point loss weight w(sigma): sigma_sqrt -> sigma^-2, cosmap -> 2/(pi(1 - 2s + 2s²)), else 1."""
    if scheme == "sigma_sqrt":
        return sigma.pow(-2.0)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-point loss ``[P]``: mean over all non-batch dims of w * (pred - target)², in float32+."""
    diff = (at_least_f32(pred) - at_least_f32(target)) ** 2
    return weight.to(diff.dtype) * diff.flatten(1).mean(dim=1)


@dataclass(frozen=True)
class FlowMatchingConfig:
    """The ``train`` keys of the flow-matching objective (SFT, SOAR and pretraining; ``TrainConfig`` inherits them)."""

    weighting_scheme: WeightingScheme = "logit_normal"  # timestep density and loss weight, as in SD3 training
    logit_mean: float = 0.0  # mean of the logit-normal timestep density
    logit_std: float = 1.0  # std of the logit-normal timestep density
    mode_scale: float = 1.29  # scale of the "mode" timestep density (1.29 in SD3)
    cond_dropout_rate: float = 0.1  # per-sample probability of training on the empty prompt

    def __post_init__(self) -> None:
        check(0 <= self.cond_dropout_rate < 1, "cond_dropout_rate", "must be in [0, 1)")
        positive(self, "logit_std", "mode_scale")
