"""The rollout formulas (docs/method.md#step-3-cfg-rollout) by hand, and how the step composes paths
(float64, CPU).

Hand examples use one 2×2 state (shape [1, 1, 2, 2]) with
z = [[1, 2], [3, 4]], v = [[0.5, -1], [2, 0]], eps = [[1, 0], [-1, 2]], sigma0 = 0.5, sigma1 = 0.25
(dt = sigma1 - sigma0 = -0.25); every expected number below is worked out in the comment above it.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import step_settings

from soar.flow import shift_sigma, sigma_from_t, sigma_grid
from soar.rollout import STOCHASTIC_STEPS, cps_step, flow_sde_step, ode_step, sde_step, simple_step, stochastic_step
from soar.step import StepSettings, TextCond, build_points, draw, training_step

pytestmark = pytest.mark.usefixtures("float64_default")  # closed forms in float64

F64 = torch.float64
Z = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64).reshape(1, 1, 2, 2)
V = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=F64).reshape(1, 1, 2, 2)
EPS = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=F64).reshape(1, 1, 2, 2)
S0, S1 = torch.tensor([0.5], dtype=F64), torch.tensor([0.25], dtype=F64)
GRID = sigma_grid(1000, 3.0)
CAP = float(GRID[1])  # sigmas[1], what the step passes as sigma_cap


def hand(rows) -> torch.Tensor:
    return torch.tensor(rows).reshape(1, 1, 2, 2)


def test_ode_step_by_hand():
    # z + dt v = z - 0.25 v
    torch.testing.assert_close(ode_step(Z, V, S0, S1), hand([[0.875, 2.25], [2.5, 4.0]]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["simple", "flow_sde", "cps"])
def test_zero_noise_scale_is_the_ode_step(kind):
    """At eta = 0 these three ARE the Euler ODE step, whatever the noise:

    simple:   z + v dt + 0 · sqrt(|dt|) eps = z + v dt.
    flow_sde: std = 0, so z (1 + 0) + v (1 + 0) dt + 0 = z + v dt.
    cps:      std = sigma1 sin(0) = 0, so (1 - s1)(z - s0 v) + sqrt(s1²) (z + (1 - s0) v)
              = z + v (-(1 - s1) s0 + s1 (1 - s0)) = z + (s1 - s0) v.
    """
    g = torch.Generator().manual_seed(0)
    z, v, eps = (torch.randn(5, 3, 4, 4, generator=g) for _ in range(3))
    sigma0 = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.05])  # includes the sigma0 = 1 branch of flow_sde
    sigma1 = torch.tensor([0.95, 0.7, 0.45, 0.01, 0.0])
    out = STOCHASTIC_STEPS[kind](z, v, sigma0, sigma1, eps, 0.0, sigma_cap=CAP)
    torch.testing.assert_close(out, ode_step(z, v, sigma0, sigma1), rtol=0, atol=1e-14)
    # and the noise matters as soon as eta > 0 (so the check above can fail)
    noisy = STOCHASTIC_STEPS[kind](z, v, sigma0, sigma1, eps, 0.3, sigma_cap=CAP)
    assert (noisy - out)[:4].abs().max() > 1e-3


def test_sde_is_not_the_ode_step_and_ignores_eta():
    """sde re-noises the predicted clean latent with FRESH noise: not the ODE step even at eta = 0.

    x̂0 = z - 0.5 v = [[0.75, 2.5], [2, 4]];  z' = 0.75 x̂0 + 0.25 eps
       = [[0.5625 + 0.25, 1.875 + 0], [1.5 - 0.25, 3 + 0.5]] = [[0.8125, 1.875], [1.25, 3.5]].
    """
    expected = hand([[0.8125, 1.875], [1.25, 3.5]])
    for eta in (0.0, 0.7):  # docs/method.md#step-3-cfg-rollout: the sde formula has no eta
        torch.testing.assert_close(sde_step(Z, V, S0, S1, EPS, eta), expected, rtol=0, atol=1e-15)
    assert (expected - ode_step(Z, V, S0, S1)).abs().max() > 0.1
    # its deterministic part (eps = 0) is (1 - sigma1) x̂0, still not the ODE step
    torch.testing.assert_close(sde_step(Z, V, S0, S1, torch.zeros_like(EPS), 0.0),
                               hand([[0.5625, 1.875], [1.5, 3.0]]), rtol=0, atol=1e-15)


def test_simple_by_hand():
    # eta = 0.4: z - 0.25 v + 0.4 · sqrt(0.25) eps = z - 0.25 v + 0.2 eps
    out = simple_step(Z, V, S0, S1, EPS, 0.4)
    torch.testing.assert_close(out, hand([[1.075, 2.25], [2.3, 4.4]]), rtol=0, atol=1e-15)


def test_flow_sde_by_hand():
    """eta = 0.5: std = 0.5 sqrt(0.5 / (1 - 0.5)) = 0.5, std² = 0.25;
    z coef 1 + 0.25 / (2 · 0.5) · (-0.25) = 0.9375; v coef (1 + 0.25 · 0.5 / 1) · (-0.25) = -0.28125;
    noise coef 0.5 · sqrt(0.25) = 0.25.  z' = 0.9375 z - 0.28125 v + 0.25 eps.
    """
    out = flow_sde_step(Z, V, S0, S1, EPS, 0.5, sigma_cap=CAP)
    torch.testing.assert_close(out, hand([[1.046875, 2.15625], [2.0, 4.25]]), rtol=0, atol=1e-15)


def test_flow_sde_at_sigma0_one_uses_sigmas1():
    """sigma0 = 1, sigma1 = 0.75, eta = 0.5, sigma_cap (sigmas[1]) = 0.8: std = 0.5 sqrt(1 / (1 - 0.8)),
    std² = 1.25; z coef 1 + 1.25 / 2 · (-0.25) = 0.84375; v coef (1 + 0) · (-0.25); noise 0.25 sqrt(5)."""
    one, s1 = torch.tensor([1.0]), torch.tensor([0.75])
    out = flow_sde_step(Z, V, one, s1, EPS, 0.5, sigma_cap=0.8)
    expected = 0.84375 * Z - 0.25 * V + 0.25 * math.sqrt(5) * EPS
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    assert torch.isfinite(flow_sde_step(Z, V, one, s1, EPS, 0.5, sigma_cap=CAP)).all()


def test_cps_by_hand():
    """eta with sin(eta pi/2) = 0.6: std = 0.25 · 0.6 = 0.15, sqrt(s1² - std²) = 0.25 · 0.8 = 0.2;
    z' = 0.75 (z - 0.5 v) + 0.2 (z + 0.5 v) + 0.15 eps = 0.95 z - 0.275 v + 0.15 eps."""
    eta = 2 / math.pi * math.asin(0.6)
    out = cps_step(Z, V, S0, S1, EPS, eta)
    torch.testing.assert_close(out, hand([[0.9625, 2.175], [2.15, 4.1]]), rtol=0, atol=1e-14)


def test_unknown_rollout_type_names_the_key():
    with pytest.raises(ValueError, match="soar.sde_rollout_type"):
        stochastic_step("ddim")


# ---- how build_points composes paths (u_aux = 0 puts sigma' = sigma1, so z_aux = z'1: the rolled state) ----

def settings(**kw) -> StepSettings:
    return step_settings(**{"num_rollout_paths": 3, "trajectory_length": 2, **kw})


def affine_model(z, sigma, embeds, pooled):
    """A text-dependent velocity, so CFG matters: v = 0.3 z + sigma + mean(pooled)."""
    return 0.3 * z + sigma.reshape(-1, 1, 1, 1) + pooled.mean(1).reshape(-1, 1, 1, 1)


def setup(s: StepSettings, t: list[float], u_fill: float | None = 0.0, seed: int = 0):
    b = len(t)
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(b, 3, 4, 4, generator=g)
    cond = TextCond(torch.randn(b, 2, 6, generator=g), torch.randn(b, 5, generator=g))
    uncond = TextCond(torch.zeros(1, 2, 6), torch.zeros(1, 5))
    d = draw(z0, s, g)
    d = dataclasses.replace(d, t=torch.tensor(t))
    if u_fill is not None:
        d = dataclasses.replace(d, u_aux=torch.full_like(d.u_aux, u_fill))
    return z0, cond, uncond, d


T_MIXED = [0.01, 0.3, 0.9995, 0.02]  # N = 40: samples 0, 3 have t1 = max(t - 0.025, 0) = 0; sample 2 sigma0 = 1


@pytest.mark.parametrize("kind", sorted(STOCHASTIC_STEPS))
def test_paths_one_ode_plus_stochastic_only_where_t1_positive(kind):
    s = settings(sde_rollout_type=kind)
    z0, cond, uncond, d = setup(s, T_MIXED)
    pts = build_points(affine_model, z0, cond, uncond, GRID, s, d)
    aux = pts.owner[pts.is_aux]
    # per sample: T from the ODE path, plus (M - 1) T where t1 > 0
    assert torch.bincount(aux, minlength=4).tolist() == [2, 6, 6, 2]
    assert float(pts.stats["frac_t0"]) == 0.5
    out = training_step(affine_model, z0, cond, uncond, GRID, s, None, backward=lambda loss: None, draws=d)
    assert float(out["aux_per_sample"]) == 16 / 4 and float(out["frac_t0"]) == 0.5
    # the rolled states, recomputed by hand: ODE for every sample, path m's noise eps[m - 1, i]
    t = torch.tensor(T_MIXED)
    sigma0 = sigma_from_t(t, GRID, allow_zero=False)
    sigma1 = sigma_from_t((t - 0.025).clamp_min(0), GRID, allow_zero=True)
    z_t0 = (1 - sigma0.reshape(-1, 1, 1, 1)) * z0 + sigma0.reshape(-1, 1, 1, 1) * d.z1
    v_c, v_u = affine_model(z_t0, sigma0, None, cond.pooled), affine_model(z_t0, sigma0, None, uncond.pooled)
    v_cfg = v_u + 4.5 * (v_c - v_u)
    rolled = pts.z[pts.is_aux][::2]  # u_aux = 0: both points of a path sit at z'1
    # rows: ODE path samples 0..3, then path 1 samples 1, 2, then path 2 samples 1, 2
    expected = [ode_step(z_t0, v_cfg, sigma0, sigma1)]
    for m in (1, 2):
        for i in (1, 2):
            expected.append(STOCHASTIC_STEPS[kind](z_t0[i:i + 1], v_cfg[i:i + 1], sigma0[i:i + 1], sigma1[i:i + 1],
                                                   d.eps[m - 1, i:i + 1], 0.5, sigma_cap=CAP))
    expected = torch.cat(expected)
    # samples with t1 = 0 have sigma1 = 0 and sigma' = the grid floor, so their "z'1" row is re-noised slightly
    floor = float(GRID[-2])
    alpha = torch.tensor([floor if i in (0, 3) else 0.0 for i in range(4)] + [0.0] * 4).reshape(-1, 1, 1, 1)
    z1_rows = torch.cat([d.z1, d.z1[1:3], d.z1[1:3]])
    torch.testing.assert_close(rolled, (1 - alpha) * expected + alpha * z1_rows, rtol=0, atol=1e-12)


def test_single_path_has_no_stochastic_points():
    s = settings(num_rollout_paths=1, trajectory_length=3)
    z0, cond, uncond, d = setup(s, T_MIXED, u_fill=None)
    pts = build_points(affine_model, z0, cond, uncond, GRID, s, d)
    assert torch.bincount(pts.owner[pts.is_aux]).tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("ratio", [None, 1.5, 0.5])
def test_sigma_upper_ratio_bounds_aux_sigmas(ratio):
    """sigma' = lo + u (hi - lo), lo = sigma1, hi = min(r sigma0, 1) (1 for r = null), never below lo.

    r = 0.5 is rejected by the config (``SoarConfig``); the math still floors the range at sigma1."""
    s = settings(num_rollout_paths=1, trajectory_length=3, sigma_upper_ratio=None if ratio == 0.5 else ratio)
    if ratio == 0.5:
        object.__setattr__(s.soar, "sigma_upper_ratio", ratio)  # past the config check, to test the math's floor
    t = [0.9, 0.5, 0.2, 0.45]
    z0, cond, uncond, d = setup(s, t, u_fill=None)
    d = dataclasses.replace(d, u_aux=torch.tensor([[0.0, 0.5, 1.0]]).expand(1, 4, 3))
    pts = build_points(affine_model, z0, cond, uncond, GRID, s, d)
    sig = pts.sigma[pts.is_aux].reshape(4, 3)
    tt = torch.tensor(t)
    sigma0 = sigma_from_t(tt, GRID, allow_zero=False)
    lo = sigma_from_t(tt - 0.025, GRID, allow_zero=True)
    hi = torch.ones(4) if ratio is None else torch.minimum(ratio * sigma0, torch.ones(4))
    hi = torch.maximum(hi, lo)
    torch.testing.assert_close(sig, torch.stack([lo, (lo + hi) / 2, hi], 1), rtol=0, atol=1e-12)
    if ratio == 1.5:
        assert (hi < 1).any() and (hi == 1).any()  # both sides of the min() are exercised


def test_continuous_sigma_sampling_uses_the_shift():
    """continuous: sigma0 = 3u / (1 + 2u) (shift 3), sigma1 likewise from t1, 0 exactly at t1 = 0."""
    t = [0.01, 0.3, 0.9995, 0.6]
    s = settings(num_rollout_paths=1, trajectory_length=1, sigma_sampling="continuous")
    z0, cond, uncond, d = setup(s, t)
    pts = build_points(affine_model, z0, cond, uncond, GRID, s, d, shift=3.0)
    tt = torch.tensor(t)
    torch.testing.assert_close(pts.sigma[:4], 3 * tt / (1 + 2 * tt), rtol=0, atol=1e-15)
    t1 = (tt - 0.025).clamp_min(0)
    expected_lo = torch.maximum(shift_sigma(t1, 3.0), GRID[-2].expand(4))  # sigma1 = 0 -> the grid floor
    torch.testing.assert_close(pts.sigma[4:], expected_lo, rtol=0, atol=1e-15)
    assert pts.sigma[2] < 1  # the grid maps t > 0.999 to sigma 1 (checked below)
    grid_pts = build_points(affine_model, z0, cond, uncond, GRID, settings(num_rollout_paths=1, trajectory_length=1),
                            d)
    torch.testing.assert_close(grid_pts.sigma[:4], sigma_from_t(tt, GRID, allow_zero=False))
    assert grid_pts.sigma[2] == 1
    with pytest.raises(ValueError, match="shift"):
        build_points(affine_model, z0, cond, uncond, GRID, s, d)
