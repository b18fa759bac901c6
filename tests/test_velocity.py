"""The velocity adapter (soar.velocity): CFG in one forward against the two-forward formula, the transformer's
timestep, input casts, and the Euler loop (soar.euler.denoise) on a closed form."""

from __future__ import annotations

import pytest
import torch

from soar.euler import denoise
from soar.flow import TIMESTEP_SCALE, interpolate
from soar.velocity import cfg_combine, transformer_velocity, with_cfg

N, SHAPE, L, D, P = 4, (3, 4, 4), 2, 6, 5


class Toy:
    """A nonlinear velocity that reads every input row by row, counting its forwards and their rows."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w_tok = torch.randn(D, SHAPE[0], generator=g, dtype=torch.float64)
        self.w_pool = torch.randn(P, SHAPE[0], generator=g, dtype=torch.float64)
        self.rows: list[int] = []

    def __call__(self, z, sigma, embeds, pooled):
        self.rows.append(z.shape[0])
        text = torch.tanh(embeds @ self.w_tok).mean(1) + pooled @ self.w_pool  # [n, C]
        s = sigma.reshape(-1, 1, 1, 1)
        return torch.sin(z) * (1 + s) + text[:, :, None, None] * s**2


def inputs(neg_rows: int = 1):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(N, *SHAPE, generator=g, dtype=torch.float64)
    sigma = torch.rand(N, generator=g, dtype=torch.float64)
    embeds, pooled = torch.randn(N, L, D, generator=g, dtype=torch.float64), torch.randn(N, P, generator=g,
                                                                                          dtype=torch.float64)
    neg = (torch.randn(neg_rows, L, D, generator=g, dtype=torch.float64),
           torch.randn(neg_rows, P, generator=g, dtype=torch.float64))
    return z, sigma, embeds, pooled, neg


@pytest.mark.parametrize("scale", [4.5, 0.0, -1.5])
def test_cfg_in_one_forward_equals_the_two_forward_formula_float64(scale):
    z, sigma, embeds, pooled, (neg_e, neg_p) = inputs()
    toy = Toy()
    got = with_cfg(toy, scale, neg_e, neg_p)(z, sigma, embeds, pooled)
    assert toy.rows == [2 * N]  # one forward: the N prompts' rows and the N negative rows together
    v_cond = toy(z, sigma, embeds, pooled)
    v_uncond = toy(z, sigma, neg_e.expand(N, -1, -1), neg_p.expand(N, -1))
    assert got.dtype == torch.float64 and got.shape == (N, *SHAPE)
    torch.testing.assert_close(got, v_uncond + scale * (v_cond - v_uncond), rtol=1e-12, atol=1e-12)


def test_scale_one_is_the_conditional_velocity():
    z, sigma, embeds, pooled, (neg_e, neg_p) = inputs()
    toy = Toy()
    got = with_cfg(toy, 1.0, neg_e, neg_p)(z, sigma, embeds, pooled)
    torch.testing.assert_close(got, toy(z, sigma, embeds, pooled), rtol=1e-12, atol=1e-12)
    v = torch.randn(N, *SHAPE, dtype=torch.float64)
    assert torch.equal(cfg_combine(v, torch.zeros_like(v), 1.0), v)


def test_negative_rows_repeat_over_the_batch():
    z, sigma, embeds, pooled, (neg_e, neg_p) = inputs(neg_rows=2)
    toy = Toy()
    got = with_cfg(toy, 3.0, neg_e, neg_p)(z, sigma, embeds, pooled)
    rows = torch.arange(N) % 2  # row r gets negative row r % 2
    v_cond, v_uncond = toy(z, sigma, embeds, pooled), toy(z, sigma, neg_e[rows], neg_p[rows])
    torch.testing.assert_close(got, v_uncond + 3.0 * (v_cond - v_uncond), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="3 negative-prompt rows do not divide the 4 rows"):
        with_cfg(toy, 3.0, neg_e.repeat(3, 1, 1)[:3], neg_p.repeat(3, 1)[:3])(z, sigma, embeds, pooled)


class Spy(torch.nn.Module):
    """A stand-in for ``SD3Transformer2DModel``: records the keyword arguments of every forward."""

    def __init__(self, dtype=torch.float32) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones((), dtype=dtype))
        self.calls: list[dict] = []

    def forward(self, *, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        self.calls.append(dict(hidden_states=hidden_states, timestep=timestep, embeds=encoder_hidden_states,
                               pooled=pooled_projections, return_dict=return_dict))
        return (hidden_states * self.weight - 1,)


def test_transformer_adapter_passes_timestep_sigma_times_1000():
    spy = Spy()
    z, sigma = torch.randn(N, *SHAPE), torch.tensor([1.0, 0.5, 0.123, 0.0])
    embeds, pooled = torch.randn(N, L, D), torch.randn(N, P)
    v = transformer_velocity(spy)(z, sigma, embeds, pooled)
    (call,) = spy.calls
    assert TIMESTEP_SCALE == 1000.0
    assert torch.equal(call["timestep"], sigma * 1000) and call["timestep"].dtype == torch.float32
    assert call["hidden_states"] is z and call["embeds"] is embeds and call["pooled"] is pooled
    assert call["return_dict"] is False
    assert torch.equal(v, z - 1)


def test_cast_inputs_go_to_the_weights_dtype_but_the_timestep_keeps_its_own():
    spy = Spy(torch.bfloat16)
    z, sigma = torch.randn(N, *SHAPE), torch.tensor([0.999, 0.5, 0.123, 0.0])
    embeds, pooled = torch.randn(N, L, D), torch.randn(N, P)
    out = with_cfg(transformer_velocity(spy, cast_inputs=True), 4.5, embeds[:1], pooled[:1])(z, sigma, embeds, pooled)
    (call,) = spy.calls
    assert call["hidden_states"].dtype == call["embeds"].dtype == call["pooled"].dtype == torch.bfloat16
    assert call["timestep"].dtype == torch.float32 and torch.equal(call["timestep"], torch.cat([sigma, sigma]) * 1000)
    assert out.dtype == torch.float32  # the guidance arithmetic is done in float32, not bf16


def test_euler_loop_with_the_true_velocity_lands_on_the_data():
    g = torch.Generator().manual_seed(2)
    z0, z1 = torch.randn(N, *SHAPE, generator=g), torch.randn(N, *SHAPE, generator=g)
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.1, 0.0], dtype=torch.float64)
    seen = []

    def true_velocity(z, sigma, embeds, pooled):
        seen.append(sigma.clone())
        torch.testing.assert_close(z, interpolate(z0, z1, sigma))  # every state on the straight path
        return z1 - z0

    out = denoise(true_velocity, z1, sigmas, torch.zeros(N, L, D), torch.zeros(N, P))
    torch.testing.assert_close(out, z0)
    assert [s.tolist() for s in seen] == [[float(s)] * N for s in sigmas[:-1].float()]
