"""Exposure-bias meter: how far k sampler steps from a true state drift from the data path.

For held-out clean latents z0 ``[B, C, H, W]`` and noise z1 ``[B, C, H, W]`` the true states are
z*_sigma = (1 - sigma) z0 + sigma z1. From z*_{sigma_i} (``sigmas[i]``, i in ``starts``) the model runs
k = 1..K Euler steps of the sampler's schedule, z <- z + (sigma_{j+1} - sigma_j) v(z, sigma_j), and the
drift is the distance of the reached state z_k to the true state at the reached sigma:

    D_i(k) = mean_b || z_k,b - z*_{sigma_{i+k}},b ||_2 / sqrt(C H W)     (per-sample RMS, batch mean)

A model that outputs v* = z1 - z0 on the path has D = 0; a constant error b in v gives
D_i(k) = (sigma_i - sigma_{i+k}) RMS(b), and an error that grows off the path compounds. The
"standstill" distance (not moving: z_k = z*_{sigma_i}) is (sigma_i - sigma_{i+k}) mean_b RMS(z1 - z0),
the scale the relative drift is measured against.

Pure tensor code: every start and sample goes through the velocity in ONE batch per step; states
and distances are in float32, or float64 when z0 is float64 (closed-form tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from soar.flow import at_least_f32, interpolate
from soar.rollout import ode_step
from soar.velocity import transformer_velocity, with_cfg

StateVelocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z [N, C, H, W], sigma [N]) -> v, prompts bound


def _tile(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x [B, ...]`` -> ``[n B, ...]``: n copies one after another (row r is x[r % B])."""
    return x.repeat(n, *([1] * (x.ndim - 1)))


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS ``[N]`` of ``x [N, ...]``: ||x|| / sqrt(number of non-batch entries)."""
    return x.flatten(1).pow(2).mean(dim=1).sqrt()


def _check(z0: torch.Tensor, z1: torch.Tensor, sigmas: torch.Tensor, starts: Sequence[int] | torch.Tensor,
           max_k: int) -> torch.Tensor:
    """Validate the arguments; returns ``starts`` as a long tensor ``[P]`` on z0's device."""
    if z0.shape != z1.shape or z0.ndim < 2 or z0.shape[0] == 0:
        raise ValueError(f"z0 {tuple(z0.shape)} and z1 {tuple(z1.shape)} must be equal non-empty [B, C, H, W] batches")
    if sigmas.ndim != 1 or sigmas.numel() < 2 or not bool(torch.all(sigmas[1:] < sigmas[:-1])):
        raise ValueError("sigmas must be the sampler's schedule [S + 1], strictly decreasing (e.g. 1 -> 0)")
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
        raise ValueError(f"max_k must be an int >= 1 (number of sampler steps), got {max_k!r}")
    index = torch.as_tensor(starts)
    if index.ndim != 1 or index.numel() == 0 or index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"starts must be a non-empty sequence of integer indices into sigmas, got {starts!r}")
    steps = sigmas.numel() - 1
    if bool(torch.any((index < 0) | (index >= steps))):
        raise ValueError(f"starts {index.tolist()}: rollouts begin at sigmas[0..{steps - 1}] "
                         f"(a schedule of S = {steps} steps; sigmas[S] = {float(sigmas[-1])} is its end)")
    return index.long().to(z0.device)


def standstill_curves(z0: torch.Tensor, z1: torch.Tensor, sigmas: torch.Tensor,
                      starts: Sequence[int] | torch.Tensor, max_k: int) -> torch.Tensor:
    """Distance of not moving, ``[P, max_k]``: (sigma_i - sigma_{i+k}) mean_b RMS(z1 - z0)_b; NaN past the end.

    The D(k) of the "model" z_k = z*_{sigma_i} (same distance as ``drift_curves``), the denominator
    of the relative drift. ``z0, z1 [B, ...]``, ``sigmas [S + 1]``, ``starts`` indices ``[P]``.
    """
    index = _check(z0, z1, sigmas, starts, max_k)
    dtype = at_least_f32(z0).dtype
    sig = sigmas.to(z0.device, dtype)
    steps = sig.numel() - 1
    target = index[:, None] + torch.arange(1, max_k + 1, device=z0.device)  # [P, K]
    gap = sig[index][:, None] - sig[target.clamp(max=steps)]
    scale = _rms(z1.to(dtype) - z0.to(dtype)).mean()
    return torch.where(target <= steps, gap * scale, torch.full_like(gap, float("nan")))


@torch.no_grad()
def drift_curves(velocity: StateVelocity, z0: torch.Tensor, z1: torch.Tensor, sigmas: torch.Tensor,
                 starts: Sequence[int] | torch.Tensor, max_k: int, *, relative: bool = False) -> torch.Tensor:
    """Drift D_i(k) ``[P, max_k]`` (row p: start ``starts[p]``, column k - 1: after k steps).

    ``z0, z1 [B, C, H, W]``: held-out clean latents and their noise; ``sigmas [S + 1]``: the sampler's
    decreasing schedule (e.g. ``soar.euler.sampling_sigmas(bundle, 40)``); ``starts [P]``: indices
    0 <= i < S where rollouts begin at z*_{sigma_i}; k = 1..max_k Euler steps along the schedule.
    D_i(k) = mean_b ||z_k,b - z*_{sigma_{i+k}},b|| / sqrt(C H W). Entries with i + k > S (past the
    schedule's end) are NaN. ``relative=True`` divides by ``standstill_curves`` (1 = as far from the
    path as not moving at all).

    ``velocity(z [n B, C, H, W], sigma [n B]) -> v [n B, C, H, W]`` (CFG included, e.g. ``cfg_velocity_fn``)
    is called once per step with the n starts still running, rows grouped by start and, in each
    group, in the order of z0 (row r is sample r % B); starts that reached the end leave the batch.
    """
    index = _check(z0, z1, sigmas, starts, max_k)
    dtype = at_least_f32(z0).dtype
    z0, z1, sig = z0.to(dtype), z1.to(dtype), sigmas.to(z0.device, dtype)
    batch, steps = z0.shape[0], sig.numel() - 1
    out = torch.full((index.numel(), max_k), float("nan"), dtype=dtype, device=z0.device)
    running = torch.arange(index.numel(), device=z0.device)  # positions in starts still on the schedule
    z = interpolate(_tile(z0, running.numel()), _tile(z1, running.numel()),
                    sig[index].repeat_interleave(batch))
    for k in range(1, max_k + 1):
        keep = index[running] + k <= steps
        if not bool(keep.all()):
            z, running = z[keep.repeat_interleave(batch)], running[keep]
        if running.numel() == 0:
            break
        now = (index[running] + k - 1).repeat_interleave(batch)  # per-row schedule index
        v = velocity(z, sig[now])
        if v.shape != z.shape:
            raise ValueError(f"velocity returned {tuple(v.shape)} for states {tuple(z.shape)}")
        z = ode_step(z, v.to(dtype), sig[now], sig[now + 1])
        n = running.numel()
        true = interpolate(_tile(z0, n), _tile(z1, n), sig[now + 1])
        out[running, k - 1] = _rms(z - true).view(n, batch).mean(dim=1)
    if relative:
        out = out / standstill_curves(z0, z1, sig, index, max_k)
    return out


def cfg_velocity_fn(transformer, embeds: torch.Tensor, pooled: torch.Tensor, neg_embeds: torch.Tensor,
                    neg_pooled: torch.Tensor, guidance_scale: float) -> StateVelocity:
    """The CFG velocity of a diffusers ``SD3Transformer2DModel`` for ``drift_curves`` (as evaluation samples).

    ``embeds [B, L, D]`` / ``pooled [B, P]``: the held-out images' prompts, in the order of z0;
    ``neg_embeds [1 or B, L, D]`` / ``neg_pooled [1 or B, P]``: the negative prompt (c∅, "" in
    evaluation). The returned ``velocity(z [n B, C, H, W], sigma [n B])`` repeats the conditioning
    for the n starts (row r gets prompt r % B) and runs ``soar.velocity.with_cfg`` of
    ``transformer_velocity``: cond and uncond rows in ONE forward of 2nB rows in the weights' dtype,
    then v = v(c∅) + s (v(c) - v(c∅)) in float32 (float64 with float64 weights), as the Euler sampler.
    """
    param = next(transformer.parameters())
    device, dtype, batch = param.device, param.dtype, embeds.shape[0]
    embeds, pooled = embeds.to(device, dtype), pooled.to(device, dtype)
    neg_embeds = neg_embeds.to(device, dtype).expand(batch, -1, -1)
    neg_pooled = neg_pooled.to(device, dtype).expand(batch, -1)
    guided = with_cfg(transformer_velocity(transformer, cast_inputs=True), guidance_scale, neg_embeds, neg_pooled)

    @torch.no_grad()
    def velocity(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if z.shape[0] % batch:
            raise ValueError(f"{z.shape[0]} rows are not a whole number of copies of the {batch} prompts")
        n = z.shape[0] // batch
        return guided(z, sigma, _tile(embeds, n), _tile(pooled, n))

    return velocity
