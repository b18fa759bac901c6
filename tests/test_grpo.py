"""Flow-GRPO's math (soar.grpo) against closed forms and the reference formulas, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from soar.grpo import group_advantages, ppo_clipped_loss, reference_kl, sde_step_with_logprob
from soar.rollout import flow_sde_step

G = torch.Generator().manual_seed(0)
Z, V, EPS = (torch.randn(3, 2, 4, 4, generator=G, dtype=torch.float64) for _ in range(3))
S0 = torch.tensor([1.0, 0.6, 0.2], dtype=torch.float64)
S1 = torch.tensor([0.9, 0.5, 0.0], dtype=torch.float64)
CAP, ETA = 0.95, 0.7


def test_step_is_the_rollout_flow_sde_step_and_its_log_prob_the_gaussian_density():
    step = sde_step_with_logprob(Z, V, S0, S1, ETA, CAP, eps=EPS)
    assert torch.equal(step.z_next, flow_sde_step(Z, V, S0, S1, EPS, ETA, sigma_cap=CAP))  # one formula, shared
    s0 = torch.where(S0 >= 1, torch.full_like(S0, CAP), S0)
    std = ETA * torch.sqrt(S0 / (1 - s0))
    scale = (std * torch.sqrt(S0 - S1)).view(-1, 1, 1, 1)
    assert torch.allclose(step.scale, scale, rtol=0, atol=1e-15)
    density = torch.distributions.Normal(step.mean, scale).log_prob(step.z_next).flatten(1).mean(1)
    assert torch.allclose(step.log_prob, density, rtol=0, atol=1e-12)
    # with z_next = mean + scale eps the density is -eps²/2 - log(scale) - log sqrt(2 pi), averaged
    by_hand = (-EPS**2 / 2).flatten(1).mean(1) - torch.log(scale.flatten()) - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(step.log_prob, by_hand, rtol=0, atol=1e-12)


def test_a_recorded_step_rescored_under_its_own_velocity_has_the_same_log_prob_and_gradient_through_the_mean():
    first = sde_step_with_logprob(Z, V, S0, S1, ETA, CAP, eps=EPS)
    v = V.clone().requires_grad_(True)
    again = sde_step_with_logprob(Z, v, S0, S1, ETA, CAP, z_next=first.z_next)
    assert torch.allclose(again.log_prob, first.log_prob, rtol=0, atol=1e-12)
    again.log_prob.sum().backward()
    # d logp / d v = (z_next - mean) / scale² * d mean / d v / D, d mean / d v = (1 + std² (1 - s)/(2 s)) dt
    d = Z[0].numel()
    sg, dt = S0.view(-1, 1, 1, 1), (S1 - S0).view(-1, 1, 1, 1)
    dmean_dv = (1 + first.std**2 * (1 - sg) / (2 * sg)) * dt
    expected = (first.z_next - first.mean) / first.scale**2 * dmean_dv / d
    assert torch.allclose(v.grad, expected, rtol=1e-10, atol=1e-12)
    other = sde_step_with_logprob(Z, V + 0.1, S0, S1, ETA, CAP, z_next=first.z_next)  # another policy's density
    density = torch.distributions.Normal(other.mean, first.scale).log_prob(first.z_next).flatten(1).mean(1)
    assert torch.allclose(other.log_prob, density, rtol=0, atol=1e-12)
    assert (other.log_prob - first.log_prob).abs().min() > 1e-4


@pytest.mark.parametrize("eta", [0.0, -0.5])
def test_no_noise_is_refused(eta):
    with pytest.raises(ValueError, match="grpo.noise_level must be > 0"):
        sde_step_with_logprob(Z, V, S0, S1, eta, CAP, eps=EPS)


def test_a_step_away_from_the_data_and_a_step_without_noise_or_state_are_refused():
    with pytest.raises(ValueError, match="sigma1 must be below its sigma0"):
        sde_step_with_logprob(Z, V, S0, S0, ETA, CAP, eps=EPS)
    with pytest.raises(ValueError, match="give the noise eps"):
        sde_step_with_logprob(Z, V, S0, S1, ETA, CAP)


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    groups = torch.tensor([0, 1, 0, 2, 1, 0])  # prompts a, b, a, c, b, a

    def pop_std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))

    sa, sb = pop_std([1.0, 3.0, 6.0]) + 1e-4, pop_std([2.0, 5.0]) + 1e-4  # group b: std 1.5
    expected = [(1 - 10 / 3) / sa, (2 - 3.5) / sb, (3 - 10 / 3) / sa, 0.0, (5 - 3.5) / sb, (6 - 10 / 3) / sa]
    adv = group_advantages(rewards, groups)
    assert adv.dtype == torch.float64
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    everything = pop_std([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) + 1e-4
    means = {0: 10 / 3, 1: 3.5, 2: 4.0}
    expected_global = [(r - means[int(g)]) / everything for r, g in zip(rewards.tolist(), groups, strict=True)]
    assert torch.allclose(group_advantages(rewards, groups, global_std=True),
                          torch.tensor(expected_global, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(group_advantages(torch.full((4,), 0.7), torch.tensor([3, 3, 3, 3])), torch.zeros(4,
                                                                                                     dtype=torch.float64))


def test_clipped_objective_value_and_zero_gradient_outside_the_clip_range():
    eps = 0.2
    old = torch.zeros(6, dtype=torch.float64)
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -2.0], dtype=torch.float64)
    log_prob = ratios.log().requires_grad_(True)
    loss, stats = ppo_clipped_loss(log_prob, old, adv, eps, adv_clip_max=5.0)
    # per sample max(-A r, -A clip(r)): 1.5,A=1 -> -1.2; 1.5,A=-1 -> 1.5; 0.5,A=1 -> -0.5; 0.5,A=-1 -> 0.8; inside: -A r
    per = torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.2, 1.8], dtype=torch.float64)
    assert torch.allclose(loss, per.mean(), rtol=0, atol=1e-12)
    loss.backward()
    # d/dlogp of -A r is -A r / 6 where the unclipped term is taken; zero where the clipped constant is
    expected = torch.tensor([0.0, 1.5, -0.5, 0.0, -2.2, 1.8], dtype=torch.float64) / 6
    assert torch.allclose(log_prob.grad, expected, rtol=0, atol=1e-12)
    assert float(stats["clipfrac"]) == pytest.approx(4 / 6)
    assert float(stats["approx_kl"]) == pytest.approx(0.5 * float((ratios.log() ** 2).mean()))
    clipped_adv, _ = ppo_clipped_loss(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                                      torch.tensor([10.0, -10.0], dtype=torch.float64), eps, adv_clip_max=5.0)
    assert float(clipped_adv) == 0.0  # ratio 1: -A; A clipped to +-5, mean of -5 and 5


def test_kl_is_zero_for_the_reference_and_dt_times_the_gaussian_kl_otherwise():
    step = sde_step_with_logprob(Z, V, S0, S1, ETA, CAP, eps=EPS)
    assert float(reference_kl(step.mean, step.mean, step.std)) == 0.0
    ref = sde_step_with_logprob(Z, V + 0.3 * EPS, S0, S1, ETA, CAP, eps=EPS)
    per_dim = torch.distributions.kl_divergence(torch.distributions.Normal(step.mean, step.scale.expand_as(step.mean)),
                                                torch.distributions.Normal(ref.mean, ref.scale.expand_as(ref.mean)))
    expected = ((S0 - S1) * per_dim.flatten(1).mean(1)).mean()
    assert torch.allclose(reference_kl(step.mean, ref.mean, step.std), expected, rtol=1e-12, atol=0)
