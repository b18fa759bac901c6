"""Closed-form checks of the SOAR math (docs/method.md#checks-that-follow-from-the-math), in float64 on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import step_settings

from soar.flow import interpolate, loss_weight, sample_t, sigma_from_t, sigma_grid, weighted_mse
from soar.objective import loss_denominator, soar_loss
from soar.rollout import aux_points, aux_sigmas, ode_step, sigma_upper
from soar.step import TextCond, training_step
from soar.velocity import cfg_combine

pytestmark = pytest.mark.usefixtures("float64_default")  # closed forms in float64


settings = step_settings


def test_sigma_grid_equals_scheduler_sigmas():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    grid = sigma_grid(1000, 3.0)
    assert grid.shape == (1001,)
    torch.testing.assert_close(grid[:-1], sched.sigmas.double(), rtol=1e-6, atol=1e-7)
    assert grid[-1] == 0 and grid[0] == 1


def test_sigma_from_t_indexing_and_boundary():
    grid = sigma_grid(1000, 3.0)
    t = torch.tensor([1.0, 0.5, 1e-4, 0.0])
    main = sigma_from_t(t, grid, allow_zero=False)
    roll = sigma_from_t(t, grid, allow_zero=True)
    assert main[0] == 1.0 and roll[0] == 1.0
    assert main[1] == grid[500]  # floor((1 - 0.5) * 1000)
    assert main[3] == grid[999] > 0  # main points never reach sigma 0
    assert roll[3] == 0.0 and roll[2] == grid[999]  # only t = 0 exactly reaches the terminal 0


def test_interpolate_and_velocity_closed_form():
    z0, z1 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    z = interpolate(z0, z1, sigma)
    torch.testing.assert_close(z[0], z0[0])
    torch.testing.assert_close(z[2], z1[2])
    torch.testing.assert_close(z[1], 0.75 * z0[1] + 0.25 * z1[1])


def test_loss_weights_closed_forms():
    s = torch.tensor([0.2, 0.5, 0.9])
    torch.testing.assert_close(loss_weight("sigma_sqrt", s), 1 / s**2)
    torch.testing.assert_close(loss_weight("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    for scheme in ("logit_normal", "mode", "none", "uniform"):
        torch.testing.assert_close(loss_weight(scheme, s), torch.ones(3))


def test_timestep_densities():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(5, generator=g, dtype=torch.float64)
    u = sample_t("mode", 5, torch.Generator().manual_seed(0), logit_mean=0, logit_std=1, mode_scale=1.29).double()
    expected = 1 - v - 1.29 * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    torch.testing.assert_close(u, expected, rtol=1e-6, atol=1e-7)
    n = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u = sample_t("logit_normal", 5, torch.Generator().manual_seed(1), logit_mean=0.5, logit_std=2.0, mode_scale=0)
    torch.testing.assert_close(u.double(), torch.sigmoid(0.5 + 2.0 * n), rtol=1e-6, atol=1e-7)


def test_weighted_mse_is_mean_over_dims():
    pred, target = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    target[1] *= 2
    torch.testing.assert_close(weighted_mse(pred, target, torch.tensor([1.0, 0.5])), torch.tensor([1.0, 2.0]))


def test_perfect_model_rollout_stays_on_path_and_aux_targets_equal_true_velocity():
    z0, z1 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    sigma0 = torch.tensor([0.9, 0.5, 0.3, 0.05])
    sigma1 = torch.tensor([0.85, 0.4, 0.1, 0.0])
    v = z1 - z0
    z_t0 = interpolate(z0, z1, sigma0)
    # CFG of two equal (perfect) velocities is the same velocity for any scale
    torch.testing.assert_close(cfg_combine(v, v, 4.5), v)
    z_rolled = ode_step(z_t0, v, sigma0, sigma1)
    torch.testing.assert_close(z_rolled, interpolate(z0, z1, sigma1))
    sig_aux = aux_sigmas(sigma1, sigma_upper(sigma0, None), torch.rand(4, 6), sigma_floor=1e-3)
    z_aux, v_corr = aux_points(z_rolled, z0, z1, sigma1, sig_aux)
    for i in range(4):
        for k in range(6):
            torch.testing.assert_close(z_aux[i, k], interpolate(z0[i:i + 1], z1[i:i + 1], sig_aux[i, k:k + 1])[0])
            torch.testing.assert_close(v_corr[i, k], v[i])


def test_aux_points_lie_on_segment_at_stated_sigma():
    z0, z1, z_rolled = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigma1 = torch.tensor([0.2, 0.6, 0.0])
    sig_aux = aux_sigmas(sigma1, torch.tensor([1.0, 0.9, 0.5]), torch.rand(3, 5), sigma_floor=1e-3)
    assert torch.all(sig_aux >= sigma1[:, None]) and torch.all(sig_aux <= 1.0)
    z_aux, v_corr = aux_points(z_rolled, z0, z1, sigma1, sig_aux)
    alpha = (sig_aux - sigma1[:, None]) / (1 - sigma1[:, None])
    assert torch.all((alpha >= 0) & (alpha <= 1))
    a = alpha[..., None, None, None]
    torch.testing.assert_close(z_aux, (1 - a) * z_rolled[:, None] + a * z1[:, None])
    torch.testing.assert_close(v_corr * sig_aux[..., None, None, None] + z0[:, None], z_aux)


def test_sigma_upper_ratio():
    s0 = torch.tensor([0.2, 0.8])
    torch.testing.assert_close(sigma_upper(s0, None), torch.ones(2))
    torch.testing.assert_close(sigma_upper(s0, 1.5), torch.tensor([0.3, 1.0]))


def test_loss_normalisation():
    point = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    is_aux = torch.tensor([False, False, True, True, True])
    denom = loss_denominator(torch.tensor(2.0), torch.tensor(3.0), 0.5)
    assert float(soar_loss(point, is_aux, 0.5, 1 / denom)) == pytest.approx((3 + 0.5 * 12) / (2 + 1.5), rel=1e-12)
    assert loss_denominator(torch.tensor(0.0), torch.tensor(0.0), 0.0) == 1.0


def _oracle(z0: torch.Tensor):
    """A perfect model for one sample: the velocity of the straight path through z0, (z - z0)/sigma."""

    def velocity(z, sigma, embeds, pooled):
        return (z - z0) / sigma.reshape(-1, 1, 1, 1)

    return velocity


@pytest.mark.parametrize("seed", range(5))
def test_soar_loss_of_perfect_model_is_zero(seed):
    z0 = torch.randn(1, 3, 8, 8)
    cond = TextCond(torch.randn(1, 4, 6), torch.randn(1, 5))
    uncond = TextCond(torch.zeros(1, 4, 6), torch.zeros(1, 5))
    grid = sigma_grid(1000, 3.0)
    out = training_step(_oracle(z0), z0, cond, uncond, grid, settings(), torch.Generator().manual_seed(seed),
                        backward=lambda loss: None)
    assert out["aux_per_sample"] == 6
    assert abs(float(out["loss"])) < 1e-20 and float(out["drift"]) < 1e-10


class LinearVelocity(torch.nn.Module):
    """A small differentiable model: v = A z + b(sigma, text)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.text = torch.nn.Linear(5, 3)

    def forward(self, z, sigma, embeds, pooled):
        return self.conv(z) * (1 + sigma.reshape(-1, 1, 1, 1)) + self.text(pooled)[:, :, None, None]


def _sft_reference(model, z0, cond, grid, s, seed):
    """Plain SFT computed by hand with the same draws as training_step (z1, then t)."""
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(z0.shape, generator=gen)
    t = sample_t(s.flow.weighting_scheme, z0.shape[0], gen, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    sigma0 = sigma_from_t(t.double(), grid, allow_zero=False)
    pred = model(interpolate(z0, z1, sigma0), sigma0, cond.embeds, cond.pooled)
    return ((pred - (z1 - z0)) ** 2).flatten(1).mean(1).mean()


@pytest.mark.parametrize("kw", [dict(lambda_aux=0.0), dict(trajectory_length=0)])
def test_no_aux_is_exactly_sft_loss_and_gradient(kw):
    z0 = torch.randn(4, 3, 8, 8)
    cond = TextCond(torch.randn(4, 2, 6), torch.randn(4, 5))
    uncond = TextCond(torch.zeros(1, 2, 6), torch.zeros(1, 5))
    grid = sigma_grid(1000, 3.0)
    s = settings(**kw)
    model = LinearVelocity()
    out = training_step(model, z0, cond, uncond, grid, s, torch.Generator().manual_seed(3),
                        backward=lambda loss: loss.backward())
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = _sft_reference(model, z0, cond, grid, s, 3)
    ref.backward()
    torch.testing.assert_close(out["loss"], ref.detach())
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
