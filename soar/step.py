"""One SOAR (or SFT) training step: draw, roll out, build auxiliary points, one batched forward.

The model enters as ``velocity(z [N, C, H, W], sigma [N], embeds [N, L, D], pooled [N, P]) -> v``;
gradients flow through ``backward(loss_chunk)``, called once per forward chunk so that
``aux_microbatch`` bounds activation memory. Distributed state enters only through
``reduce_counts`` (sum over processes) and ``world_size``. DESIGN.md §4 numbers the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from soar.flow import at_least_f32, interpolate, loss_weight, sample_t, sigma_from_t, weighted_mse
from soar.objective import loss_denominator, soar_loss
from soar.rollout import aux_points, aux_sigmas, cfg_velocity, ode_step, sigma_upper, stochastic_step

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepSettings:
    """The knobs of one step (see ``pipeline.config.TrainConfig`` / ``SoarConfig``)."""

    lambda_aux: float
    num_rollout_paths: int
    trajectory_length: int
    num_sampling_steps: int
    sde_rollout_type: str
    sde_noise_scale: float
    cfg_scale_sampling: float
    sigma_upper_ratio: float | None
    aux_microbatch: int | None
    weighting_scheme: str
    logit_mean: float
    logit_std: float
    mode_scale: float
    cond_dropout_rate: float

    @property
    def uses_aux(self) -> bool:
        return self.lambda_aux > 0 and self.trajectory_length > 0


@dataclass(frozen=True)
class TextCond:
    """Encoded prompts: ``embeds [B, L, D]`` and ``pooled [B, P]``."""

    embeds: torch.Tensor
    pooled: torch.Tensor

    def take(self, index: torch.Tensor) -> TextCond:
        return TextCond(self.embeds[index], self.pooled[index])


def _drop_conditions(cond: TextCond, uncond: TextCond, rate: float, gen: torch.Generator) -> TextCond:
    """Per-sample condition dropout: each sample trains on c∅ with probability ``rate``."""
    drop = torch.rand(cond.embeds.shape[0], generator=gen, device=cond.embeds.device) < rate
    return TextCond(torch.where(drop[:, None, None], uncond.embeds, cond.embeds),
                    torch.where(drop[:, None], uncond.pooled, cond.pooled))


@torch.no_grad()
def _rollout_paths(velocity: Velocity, z_t0, z0, z1, t, sigma0, cond: TextCond, uncond: TextCond,
                   grid: torch.Tensor, s: StepSettings, gen: torch.Generator):
    """Steps 3-4: CFG rollout (cond + uncond in one forward, float32 update) and auxiliary points.

    Returns ``(z_aux [P, ...], sigma_aux [P], v_corr [P, ...], owner [P], stats)``.
    """
    b = z0.shape[0]
    both = velocity(torch.cat([z_t0, z_t0]), torch.cat([sigma0, sigma0]),
                    torch.cat([cond.embeds, uncond.embeds.expand_as(cond.embeds)]),
                    torch.cat([cond.pooled, uncond.pooled.expand_as(cond.pooled)]))
    v_cfg = cfg_velocity(*at_least_f32(both).chunk(2), s.cfg_scale_sampling)
    t1 = (t - 1.0 / s.num_sampling_steps).clamp_min(0)  # t is float64: exact boundary at 0
    sigma1 = sigma_from_t(t1, grid, allow_zero=True)
    upper = sigma_upper(sigma0, s.sigma_upper_ratio)
    owners = [torch.arange(b, device=z0.device)]
    paths = [ode_step(z_t0, v_cfg, sigma0, sigma1)]
    live = torch.nonzero(t1 > 0).flatten()
    step = stochastic_step(s.sde_rollout_type)
    for _ in range(s.num_rollout_paths - 1):
        eps = torch.randn(z_t0[live].shape, generator=gen, device=z0.device)
        paths.append(step(z_t0[live], v_cfg[live], sigma0[live], sigma1[live], eps, s.sde_noise_scale,
                          sigma_cap=float(grid[1])))
        owners.append(live)
    owner = torch.cat(owners)
    z_rolled = torch.cat(paths)
    u = torch.rand(owner.numel(), s.trajectory_length, generator=gen, device=z0.device)
    sig_aux = aux_sigmas(sigma1[owner], upper[owner], u, sigma_floor=float(grid[-2]))
    z_aux, v_corr = aux_points(z_rolled, z0[owner], z1[owner], sigma1[owner], sig_aux)
    owner = owner[:, None].expand_as(sig_aux).reshape(-1)
    z_aux, v_corr = z_aux.flatten(0, 1), v_corr.flatten(0, 1)
    drift = (v_corr - (z1 - z0)[owner]).abs().mean()
    stats = {"drift": drift, "frac_t0": (t1 == 0).float().mean()}
    return z_aux, sig_aux.reshape(-1), v_corr, owner, stats


def training_step(velocity: Velocity, z0: torch.Tensor, cond: TextCond, uncond: TextCond, grid: torch.Tensor,
                  s: StepSettings, gen: torch.Generator, backward: Callable[[torch.Tensor], None],
                  reduce_counts: Callable[[torch.Tensor], torch.Tensor] = lambda c: c,
                  world_size: int = 1) -> dict[str, torch.Tensor]:
    """One step on latents ``z0 [B, C, H, W]`` with prompts ``cond`` (``uncond``: the "" prompt, one row).

    Calls ``backward`` on each chunk's share of the loss; returns detached metrics (``loss`` is
    this process's share of the global objective, before the gradient average).
    """
    b = z0.shape[0]
    z1 = torch.randn(z0.shape, generator=gen, device=z0.device, dtype=z0.dtype)  # step 1
    t = sample_t(s.weighting_scheme, b, gen, logit_mean=s.logit_mean, logit_std=s.logit_std,
                 mode_scale=s.mode_scale, device=z0.device)
    sigma0 = sigma_from_t(t, grid, allow_zero=False)
    cond = _drop_conditions(cond, uncond, s.cond_dropout_rate, gen)
    z_t0 = interpolate(z0, z1, sigma0)  # step 2
    z_in, sig_in, target, owner = [z_t0], [sigma0], [z1 - z0], [torch.arange(b, device=z0.device)]
    stats: dict[str, torch.Tensor] = {}
    if s.uses_aux:
        z_aux, sig_aux, v_corr, aux_owner, stats = _rollout_paths(velocity, z_t0, z0, z1, t, sigma0, cond,
                                                                  uncond, grid, s, gen)
        z_in, sig_in, target, owner = z_in + [z_aux], sig_in + [sig_aux], target + [v_corr], owner + [aux_owner]
    z_in, sig_in, target, owner = (torch.cat(x) for x in (z_in, sig_in, target, owner))
    is_aux = torch.arange(owner.numel(), device=z0.device) >= b
    counts = reduce_counts(torch.tensor([b, owner.numel() - b], dtype=torch.float64, device=z0.device))
    normaliser = world_size / loss_denominator(counts[0], counts[1], s.lambda_aux)
    chunk = s.aux_microbatch or owner.numel()
    point_losses = []
    for lo in range(0, owner.numel(), chunk):  # step 5: one forward per chunk (one chunk by default)
        sl = slice(lo, lo + chunk)
        c = cond.take(owner[sl])
        pred = velocity(z_in[sl], sig_in[sl], c.embeds, c.pooled)
        point = weighted_mse(pred, target[sl], loss_weight(s.weighting_scheme, sig_in[sl]))
        backward(soar_loss(point, is_aux[sl], s.lambda_aux, normaliser.to(point.dtype)))
        point_losses.append(point.detach())
    point = torch.cat(point_losses)
    metrics = {"loss": soar_loss(point, is_aux, s.lambda_aux, normaliser.to(point.dtype)),
               "loss_main": point[:b].mean(), "aux_per_sample": torch.tensor((owner.numel() - b) / b)}
    if s.uses_aux:
        metrics["loss_aux"] = point[b:].mean()
    metrics.update(stats)
    return metrics
