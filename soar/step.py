"""One SOAR (or SFT) training step: draw, roll out, build auxiliary points, one batched forward.

docs/method.md#the-training-step numbers the steps 1-6. The step is three pure pieces:

- ``draw``: every random number of the step, per sample (``Draws``, row i belongs to sample i), so
  a batch split over processes sees exactly the draws its samples would get in one process;
- ``build_points`` (no gradient), steps 1-4: main points, CFG rollout, auxiliary points and targets;
- ``training_step``, steps 5-6: main and auxiliary points through the model in ONE batched forward
  (chunks of ``aux_microbatch`` points when set), the normalised loss, backward, metrics.

The model enters as ``velocity(z [N, C, H, W], sigma [N], embeds [N, L, D], pooled [N, P]) -> v``;
its timestep is sigma * 1000 for every point (``soar.velocity.transformer_velocity``). Distributed state
enters only through ``reduce_counts`` (sum over processes), ``world_size`` and ``no_sync`` (a
context that turns gradient all-reduce off). ``no_sync`` wraps the forward AND the backward of every
chunk but the last: DDP decides at forward time whether the next backward all-reduces.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from soar.flow import FlowMatchingConfig, at_least_f32, interpolate, loss_weight, sample_t, sigma_at, weighted_mse
from soar.objective import loss_denominator, soar_loss
from soar.rollout import SoarConfig, aux_points, aux_sigmas, ode_step, sigma_upper, stochastic_step
from soar.velocity import Velocity, with_cfg


@dataclass(frozen=True)
class StepSettings:
    """What one step reads: the objective's ``train`` keys and the ``soar`` section (None = SFT)."""

    flow: FlowMatchingConfig
    soar: SoarConfig | None = None  # None: SFT, no rollout and no auxiliary points

    @property
    def lambda_aux(self) -> float:
        return 0.0 if self.soar is None else self.soar.lambda_aux

    @property
    def uses_aux(self) -> bool:
        return self.lambda_aux > 0 and self.soar.trajectory_length > 0

    @property
    def sigma_sampling(self) -> str:
        return "grid" if self.soar is None else self.soar.sigma_sampling

    @property
    def aux_microbatch(self) -> int | None:
        return None if self.soar is None else self.soar.aux_microbatch


@dataclass(frozen=True)
class TextCond:
    """Encoded prompts: ``embeds [B, L, D]`` and ``pooled [B, P]``."""

    embeds: torch.Tensor
    pooled: torch.Tensor

    def take(self, index: torch.Tensor) -> TextCond:
        return TextCond(self.embeds[index], self.pooled[index])


@dataclass(frozen=True)
class Draws:
    """All random numbers of one step, indexed by sample (dim 0, or dim 1 after the path dim).

    ``z1 [B, C, H, W]`` path noise; ``t [B]`` (float64) training time u; ``drop [B]`` (bool) trains
    on the empty prompt; ``eps [M - 1, B, C, H, W]`` stochastic-path noise (read only where t1 > 0);
    ``u_aux [M, B, T]`` (float64) uniforms placing sigma' in its range (path 0 = ODE).
    """

    z1: torch.Tensor
    t: torch.Tensor
    drop: torch.Tensor
    eps: torch.Tensor
    u_aux: torch.Tensor

    def take(self, index: torch.Tensor) -> Draws:
        """The draws of the samples ``index``: what those samples get when they are the whole batch."""
        return Draws(self.z1[index], self.t[index], self.drop[index], self.eps[:, index], self.u_aux[:, index])


@dataclass(frozen=True)
class Points:
    """The training points of a step, the B main points first, then the auxiliary points.

    ``z [P, C, H, W]``, ``sigma [P]``, ``target [P, C, H, W]`` (z1 - z0 or v_corr), ``owner [P]``
    (sample index), ``is_aux [P]``; ``cond`` the prompts ``[B, ...]`` after dropout; ``stats``: drift
    (mean |v_corr - (z1 - z0)|) and frac_t0 (fraction of samples with t1 = 0), only with aux points.
    """

    z: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor
    owner: torch.Tensor
    is_aux: torch.Tensor
    cond: TextCond
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def draw(z0: torch.Tensor, s: StepSettings, gen: torch.Generator) -> Draws:
    """Draw a step's randomness for latents ``z0 [B, C, H, W]``, in the order z1, t, drop, eps, u_aux."""
    b, dev = z0.shape[0], z0.device
    z1 = torch.randn(z0.shape, generator=gen, device=dev, dtype=z0.dtype)
    t = sample_t(s.flow.weighting_scheme, b, gen, logit_mean=s.flow.logit_mean, logit_std=s.flow.logit_std,
                 mode_scale=s.flow.mode_scale, device=dev)
    drop = torch.rand(b, generator=gen, device=dev, dtype=torch.float64) < s.flow.cond_dropout_rate
    paths, length = (s.soar.num_rollout_paths, s.soar.trajectory_length) if s.uses_aux else (1, 0)
    eps = torch.randn((paths - 1, *z0.shape), generator=gen, device=dev, dtype=z0.dtype)
    u_aux = torch.rand(paths, b, length, generator=gen, device=dev, dtype=torch.float64)
    return Draws(z1, t, drop, eps, u_aux)


@torch.no_grad()
def build_points(velocity: Velocity, z0: torch.Tensor, cond: TextCond, uncond: TextCond, grid: torch.Tensor,
                 s: StepSettings, draws: Draws, shift: float | None = None) -> Points:
    """Steps 1-4 for latents ``z0 [B, C, H, W]``, prompts ``cond`` and the "" prompt ``uncond`` (one row).

    Main point: sigma0 from t (``sigma_at``), z_t0 = (1 - sigma0) z0 + sigma0 z1, target z1 - z0.
    Rollout (CFG, cond and uncond in one forward, update arithmetic in float32 or wider):
    t1 = max(t - 1/N, 0), path 0 = ODE step to sigma1, paths 1..M-1 = stochastic steps (samples with
    t1 > 0 only). Each path gets T auxiliary points on [z'1, z1] with targets v_corr. Auxiliary
    points are ordered path, then sample, then k.
    """
    b, dev = z0.shape[0], z0.device
    z1, t = draws.z1, draws.t
    cond = TextCond(torch.where(draws.drop[:, None, None], uncond.embeds, cond.embeds),
                    torch.where(draws.drop[:, None], uncond.pooled, cond.pooled))  # per-sample dropout
    sigma0 = sigma_at(t, grid, allow_zero=False, sampling=s.sigma_sampling, shift=shift)  # step 1
    z_t0 = interpolate(z0, z1, sigma0)  # step 2
    main = torch.arange(b, device=dev)
    if not s.uses_aux:
        return Points(z_t0, sigma0, z1 - z0, main, torch.zeros(b, dtype=torch.bool, device=dev), cond)
    guided = with_cfg(velocity, s.soar.cfg_scale_sampling, uncond.embeds, uncond.pooled)
    v_cfg = guided(z_t0, sigma0, cond.embeds, cond.pooled)  # step 3
    z_t0f = at_least_f32(z_t0)
    t1 = (t - 1.0 / s.soar.num_sampling_steps).clamp_min(0)  # t is float64: exact boundary at 0
    sigma1 = sigma_at(t1, grid, allow_zero=True, sampling=s.sigma_sampling, shift=shift)
    live = torch.nonzero(t1 > 0).flatten()
    step = stochastic_step(s.soar.sde_rollout_type)
    owners, paths, uniforms = [main], [ode_step(z_t0f, v_cfg, sigma0, sigma1)], [draws.u_aux[0]]
    for m in range(1, s.soar.num_rollout_paths):
        paths.append(step(z_t0f[live], v_cfg[live], sigma0[live], sigma1[live], draws.eps[m - 1, live],
                          s.soar.sde_noise_scale, sigma_cap=float(grid[1])))
        owners.append(live)
        uniforms.append(draws.u_aux[m, live])
    owner = torch.cat(owners)  # [R] one row per rolled-out state
    upper = sigma_upper(sigma0, s.soar.sigma_upper_ratio)
    sig_aux = aux_sigmas(sigma1[owner], upper[owner], torch.cat(uniforms).to(sigma1.dtype),  # step 4
                         sigma_floor=float(grid[-2]))
    z_aux, v_corr = aux_points(torch.cat(paths), z0[owner], z1[owner], sigma1[owner], sig_aux)
    owner = owner[:, None].expand_as(sig_aux).reshape(-1)
    z_aux, v_corr = z_aux.flatten(0, 1), v_corr.flatten(0, 1)
    stats = {"drift": (v_corr - (z1 - z0)[owner]).abs().mean(),
             "frac_t0": (t1 == 0).to(torch.float64).mean()}
    is_aux = torch.cat([torch.zeros(b, dtype=torch.bool, device=dev), torch.ones_like(owner, dtype=torch.bool)])
    return Points(torch.cat([z_t0, z_aux.to(z_t0.dtype)]), torch.cat([sigma0, sig_aux.reshape(-1)]),
                  torch.cat([at_least_f32(z1 - z0), v_corr]), torch.cat([main, owner]), is_aux, cond, stats)


def training_step(velocity: Velocity, z0: torch.Tensor, cond: TextCond, uncond: TextCond, grid: torch.Tensor,
                  s: StepSettings, gen: torch.Generator | None, backward: Callable[[torch.Tensor], None],
                  reduce_counts: Callable[[torch.Tensor], torch.Tensor] = lambda c: c, world_size: int = 1, *,
                  shift: float | None = None, draws: Draws | None = None,
                  no_sync: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, torch.Tensor]:
    """One step on latents ``z0 [B, C, H, W]`` with prompts ``cond`` (``uncond``: the "" prompt, one row).

    ``grid`` and ``shift`` come from the scheduler config (``shift`` is needed for continuous sigma
    sampling only). ``draws`` replaces drawing from ``gen``. Every chunk calls ``backward`` on its
    share of the loss, Σ_chunk (Σ main + lambda Σ aux) * W / max(N_main + lambda N_aux, 1) with global
    counts (docs/method.md#step-6-normalisation), all chunks but the last inside ``no_sync()``. Returns detached
    metrics: ``loss`` (this process's share before the gradient average), ``loss_main``, ``loss_aux``,
    ``aux_per_sample``, ``drift`` and ``frac_t0`` (the last three for this process's samples).
    """
    b = z0.shape[0]
    draws = draw(z0, s, gen) if draws is None else draws
    pts = build_points(velocity, z0, cond, uncond, grid, s, draws, shift)
    n = pts.owner.numel()
    counts = reduce_counts(torch.tensor([b, n - b], dtype=torch.float64, device=z0.device))
    normaliser = world_size / loss_denominator(counts[0], counts[1], s.lambda_aux)
    chunk = s.aux_microbatch or n
    point_losses = []
    for lo in range(0, n, chunk):  # step 5: one forward per chunk (one chunk by default)
        sl = slice(lo, lo + chunk)
        with nullcontext() if lo + chunk >= n else no_sync():
            c = pts.cond.take(pts.owner[sl])
            pred = velocity(pts.z[sl], pts.sigma[sl], c.embeds, c.pooled)
            point = weighted_mse(pred, pts.target[sl], loss_weight(s.flow.weighting_scheme, pts.sigma[sl]))
            backward(soar_loss(point, pts.is_aux[sl], s.lambda_aux, normaliser.to(point.dtype)))
        point_losses.append(point.detach())
    point = torch.cat(point_losses)
    metrics = {"loss": soar_loss(point, pts.is_aux, s.lambda_aux, normaliser.to(point.dtype)),
               "loss_main": point[:b].mean(), "aux_per_sample": torch.tensor((n - b) / b)}
    if s.uses_aux:
        metrics["loss_aux"] = point[b:].mean()
    return metrics | pts.stats
