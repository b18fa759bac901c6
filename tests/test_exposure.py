"""Exposure-bias meter (soar.exposure): closed forms in float64, and the tiny SD3 transformer batched vs looped."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import TINY_ARCH

from soar.exposure import cfg_velocity_fn, drift_curves, standstill_curves
from soar.flow import interpolate
from soar.models.tiny import TinyModelConfig, build_transformer

B, SHAPE = 3, (2, 4, 4)
float64 = pytest.mark.usefixtures("float64_default")  # closed forms in float64


def schedule(steps: int) -> torch.Tensor:
    """The sampler's sigmas [steps + 1] (shift 3, 1 -> 0), as soar.euler.sampling_sigmas."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double()


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, *SHAPE, generator=g, dtype=torch.float64),
            torch.randn(B, *SHAPE, generator=g, dtype=torch.float64))


def tiled(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [B, ...] repeated per start to ``rows`` rows (row r is x[r % B])."""
    return x.repeat(rows // x.shape[0], *([1] * (x.ndim - 1)))


def linear_model(z0, z1, bias, a: float = 0.0):
    """v = (z1 - z0) + bias + a (z - z*_sigma): exact on the path when bias = 0; a < 0 amplifies off-path error."""

    def velocity(z, sigma):
        zz0, zz1 = tiled(z0, z.shape[0]), tiled(z1, z.shape[0])
        return zz1 - zz0 + bias + a * (z - interpolate(zz0, zz1, sigma))

    return velocity


def expected_error(sigmas: torch.Tensor, start: int, max_k: int, a: float) -> list[float]:
    """Scalar e_k with z_k - z*_{sigma_{i+k}} = e_k bias for ``linear_model``.

    e_0 = 0 (start on the path), e_k = e_{k-1} (1 + a dt_k) + dt_k with dt_k = sigma_{i+k} - sigma_{i+k-1}.
    """
    e, out, steps = 0.0, [], len(sigmas) - 1
    for k in range(1, max_k + 1):
        if start + k > steps:
            out.append(math.nan)
            continue
        dt = float(sigmas[start + k] - sigmas[start + k - 1])
        e = e * (1 + a * dt) + dt
        out.append(e)
    return out


STARTS = [0, 3, 7, 9]


@float64
def test_oracle_velocity_has_zero_drift():
    z0, z1 = data()
    sigmas = schedule(10)
    d = drift_curves(linear_model(z0, z1, 0.0), z0, z1, sigmas, STARTS, max_k=3)
    assert d.shape == (4, 3) and d.dtype == torch.float64
    finite = ~torch.isnan(d)
    assert finite.sum() == 4 * 3 - 2  # start 9 of 10 steps has only k = 1
    torch.testing.assert_close(d[finite], torch.zeros(int(finite.sum())), rtol=0, atol=1e-12)


@float64
def test_constant_bias_closed_form_grows_with_k():
    z0, z1 = data()
    bias = 0.1 * torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = schedule(10)
    d = drift_curves(linear_model(z0, z1, bias), z0, z1, sigmas, STARTS, max_k=4)
    rms_b = float(bias.pow(2).mean().sqrt())
    expected = torch.tensor([[abs(e) * rms_b for e in expected_error(sigmas, i, 4, 0.0)] for i in STARTS])
    for p, i in enumerate(STARTS):  # |sigma_{i+k} - sigma_i| |b|
        for k in range(1, 4 + 1):
            if i + k <= 10:
                assert expected[p, k - 1] == pytest.approx(float(sigmas[i] - sigmas[i + k]) * rms_b, rel=1e-12)
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert torch.all(d[:2, 1:] > d[:2, :-1]) and d[2, 2] > d[2, 1] > d[2, 0]  # grows with k (start 7: k <= 3)
    # relative to standing still: |b| / mean_b RMS(z1 - z0) for every (start, k)
    rel = drift_curves(linear_model(z0, z1, bias), z0, z1, sigmas, STARTS, max_k=4, relative=True)
    scale = float((z1 - z0).flatten(1).pow(2).mean(1).sqrt().mean())
    finite = ~torch.isnan(rel)
    torch.testing.assert_close(rel[finite], torch.full((int(finite.sum()),), rms_b / scale), rtol=1e-12, atol=0)
    assert torch.equal(finite, ~torch.isnan(d))


@float64
def test_off_path_error_compounds_in_closed_form():
    z0, z1 = data(2)
    bias = 0.1 * torch.ones(*SHAPE, dtype=torch.float64)
    sigmas, a = schedule(10), -3.0  # dt < 0, so 1 + a dt > 1: each step amplifies the error
    d = drift_curves(linear_model(z0, z1, bias, a), z0, z1, sigmas, STARTS, max_k=5)
    expected = torch.tensor([[abs(e) * 0.1 for e in expected_error(sigmas, i, 5, a)] for i in STARTS])
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-14, equal_nan=True)
    plain = drift_curves(linear_model(z0, z1, bias), z0, z1, sigmas, STARTS, max_k=5)
    assert torch.all(d[:2, 1:] > plain[:2, 1:])  # compounding beats the pure bias drift after step 1
    torch.testing.assert_close(d[:, 0], plain[:, 0])  # identical after one step (start on the path)


@float64
def test_nan_past_end_and_standstill():
    z0, z1 = data()
    sigmas = schedule(4)
    d = drift_curves(linear_model(z0, z1, 0.5), z0, z1, sigmas, [0, 2, 3], max_k=6)
    assert torch.equal(torch.isnan(d), torch.tensor([[False] * 4 + [True] * 2, [False] * 2 + [True] * 4,
                                                     [False] + [True] * 5]))
    still = standstill_curves(z0, z1, sigmas, [0, 2, 3], max_k=6)
    assert torch.equal(torch.isnan(still), torch.isnan(d))
    scale = (z1 - z0).flatten(1).pow(2).mean(1).sqrt().mean()
    torch.testing.assert_close(still[0, :4], (sigmas[0] - sigmas[1:]) * scale, rtol=1e-12, atol=0)


@float64
def test_bad_arguments_are_named():
    z0, z1 = data()
    sigmas, v = schedule(4), linear_model(z0, z1, 0.0)
    with pytest.raises(ValueError, match=r"starts \[0, 4\]: rollouts begin at sigmas\[0..3\]"):
        drift_curves(v, z0, z1, sigmas, [0, 4], max_k=2)
    with pytest.raises(ValueError, match="starts"):
        drift_curves(v, z0, z1, sigmas, [-1], max_k=2)
    with pytest.raises(ValueError, match="non-empty sequence of integer"):
        drift_curves(v, z0, z1, sigmas, [], max_k=2)
    with pytest.raises(ValueError, match="non-empty sequence of integer"):
        drift_curves(v, z0, z1, sigmas, [0.5], max_k=2)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="max_k must be an int >= 1"):
            drift_curves(v, z0, z1, sigmas, [0], max_k=bad)
    with pytest.raises(ValueError, match="strictly decreasing"):
        drift_curves(v, z0, z1, sigmas.flip(0), [0], max_k=2)
    with pytest.raises(ValueError, match="z0"):
        drift_curves(v, z0, z1[:2], sigmas, [0], max_k=2)
    with pytest.raises(ValueError, match="velocity returned"):
        drift_curves(lambda z, s: z[:1], z0, z1, sigmas, [0], max_k=2)


@pytest.fixture(scope="module")
def tiny():
    """The tiny SD3 transformer (random init, 3x16x16 pixels) with 2 prompts and a negative prompt."""
    arch = TinyModelConfig(**TINY_ARCH)
    transformer = build_transformer(arch, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(2, 5, arch.joint_attention_dim, generator=g), torch.randn(2, 32, generator=g)
    neg = (torch.zeros(1, 5, arch.joint_attention_dim), torch.zeros(1, 32))
    z0 = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    z1 = torch.randn(2, 3, 16, 16, generator=g)
    return transformer, embeds, pooled, neg, z0, z1


def test_tiny_transformer_batched_equals_per_start_loop_with_one_forward_per_step(tiny):
    transformer, embeds, pooled, (neg_e, neg_p), z0, z1 = tiny
    rows: list[int] = []
    hook = transformer.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]),
                                                 with_kwargs=True)
    try:
        velocity = cfg_velocity_fn(transformer, embeds, pooled, neg_e, neg_p, guidance_scale=4.5)
        sigmas, starts = schedule(6), [0, 2, 4]
        batched = drift_curves(velocity, z0, z1, sigmas, starts, max_k=3)
        assert rows == [2 * 3 * 2, 2 * 3 * 2, 2 * 2 * 2]  # cond+uncond x running starts x B; start 4 ends after 2
        looped = torch.cat([drift_curves(velocity, z0, z1, sigmas, [s], max_k=3) for s in starts])
    finally:
        hook.remove()
    assert torch.isnan(batched[2, 2]) and torch.isfinite(batched[:2]).all()
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-5, equal_nan=True)
    assert torch.all(batched[:, 0] > 0)


def test_cfg_velocity_fn_matches_a_hand_cfg_forward(tiny):
    transformer, embeds, pooled, (neg_e, neg_p), z0, z1 = tiny
    velocity = cfg_velocity_fn(transformer, embeds, pooled, neg_e, neg_p, guidance_scale=4.5)
    z, sigma = torch.cat([z1, z0]), torch.tensor([1.0, 1.0, 0.3, 0.3])  # 2 starts x 2 prompts

    def one(zr, sr, e, p):
        return transformer(hidden_states=zr[None], timestep=sr[None] * 1000, encoder_hidden_states=e[None],
                           pooled_projections=p[None], return_dict=False)[0][0]

    with torch.no_grad():
        expected = torch.stack([one(z[r], sigma[r], neg_e[0], neg_p[0])
                                + 4.5 * (one(z[r], sigma[r], embeds[r % 2], pooled[r % 2])
                                         - one(z[r], sigma[r], neg_e[0], neg_p[0])) for r in range(4)])
    torch.testing.assert_close(velocity(z, sigma), expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="not a whole number of copies of the 2 prompts"):
        velocity(z[:3], sigma[:3])
