"""The model as a velocity field, and classifier-free guidance in one forward.

A ``Velocity`` is v_θ(z, σ, c) of docs/method.md#notation-and-the-timestep-convention, with the prompt
embedding c = (embeds, pooled):

    velocity(z [N, C, H, W], sigma [N], embeds [N, L, D], pooled [N, P]) -> v [N, C, H, W]

``transformer_velocity`` makes one from a diffusers ``SD3Transformer2DModel`` (timestep = σ · 1000 for
every point), and ``with_cfg`` guides one away from the negative prompt c∅ (docs/method.md#step-3-cfg-rollout):

    v_cfg = v(z, σ, c∅) + s · (v(z, σ, c) − v(z, σ, c∅))

from ONE forward of 2N rows: the N prompts' rows, then the N negative rows. Training, the SOAR
rollout, the Euler sampler (``soar.euler``), validation and the exposure meter all go through these.
Pure tensor code: no files, no tracking, no process groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from soar.flow import TIMESTEP_SCALE, at_least_f32

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def transformer_velocity(transformer, *, cast_inputs: bool = False) -> Velocity:
    """``transformer`` (an ``SD3Transformer2DModel``, or a wrapper with its forward) as a ``Velocity``.

    The transformer's timestep is sigma * ``TIMESTEP_SCALE`` (σ · 1000) for every row. ``cast_inputs=False``
    (training): the inputs go in as given, autocast and the training wrappers deal with dtypes.
    ``cast_inputs=True`` (sampling and evaluation): z, embeds and pooled go to the device and dtype of the
    weights, sigma to their device in its own dtype (the timestep is not rounded to bf16). The output is
    in the forward's dtype.
    """
    if cast_inputs:
        param = next(transformer.parameters())
        device, dtype = param.device, param.dtype

    def velocity(z: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        if cast_inputs:
            z, embeds, pooled = z.to(device, dtype), embeds.to(device, dtype), pooled.to(device, dtype)
            sigma = sigma.to(device)
        return transformer(hidden_states=z, timestep=sigma * TIMESTEP_SCALE, encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]

    return velocity


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of two velocities: v_cfg = v(c∅) + s (v(c) - v(c∅)); scale 1 gives v(c)."""
    return v_uncond + scale * (v_cond - v_uncond)


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x [R, ...]`` as ``[n, ...]``, row r = x[r % R]: one row expanded, or R rows repeated n / R times."""
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    if n % x.shape[0]:
        raise ValueError(f"{x.shape[0]} negative-prompt rows do not divide the {n} rows of the batch")
    return x.repeat(n // x.shape[0], *([1] * (x.ndim - 1)))


def with_cfg(velocity: Velocity, scale: float, neg_embeds: torch.Tensor, neg_pooled: torch.Tensor) -> Velocity:
    """``velocity`` guided by classifier-free guidance with scale ``scale`` against the negative prompt c∅.

    ``neg_embeds [R, L, D]`` / ``neg_pooled [R, P]``: c∅ as one row for every sample, or R rows with N a
    multiple of R (row r of the batch gets c∅ row r % R). The returned ``Velocity`` runs ONE forward of
    2N rows, ``velocity([z; z], [sigma; sigma], [embeds; c∅], [pooled; c∅])``, upcasts its output to
    float32 (float64 stays float64, ``flow.at_least_f32``) and returns ``cfg_combine`` of its halves,
    v_cfg = v(c∅) + s (v(c) - v(c∅)) ``[N, C, H, W]``.
    """

    def guided(z: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        out = velocity(torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([embeds, _rows(neg_embeds, n)]),
                       torch.cat([pooled, _rows(neg_pooled, n)]))
        v_cond, v_uncond = at_least_f32(out).chunk(2)
        return cfg_combine(v_cond, v_uncond, scale)

    return guided
