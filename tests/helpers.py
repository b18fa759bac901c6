"""Shared test helpers."""

from __future__ import annotations

from soar.step import StepSettings

PAPER_STEP = dict(lambda_aux=1.0, num_rollout_paths=1, trajectory_length=6, num_sampling_steps=40,
                  sde_rollout_type="flow_sde", sde_noise_scale=0.5, cfg_scale_sampling=4.5, sigma_upper_ratio=None,
                  aux_microbatch=None, weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0,
                  mode_scale=1.29, cond_dropout_rate=0.0)  # the paper's SOAR step settings (DESIGN.md §4)


def step_settings(**overrides) -> StepSettings:
    """The paper's step settings with ``overrides``."""
    return StepSettings(**{**PAPER_STEP, **overrides})
