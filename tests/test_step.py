"""The batched SOAR step against docs/method.md#the-training-step, point by point (float64, CPU).

- the one batched forward equals an explicit per-point loop (one forward per point) with the same draws;
- ``aux_microbatch`` chunks change nothing, and all chunks but the last run under ``no_sync``;
- condition dropout is per sample and dropped samples see the empty prompt in every forward;
- the logged metrics on a case with closed-form values;
- two gloo processes with batch 2 each give the gradient of one process with batch 4.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import step_settings

from soar.flow import loss_weight, sigma_from_t, sigma_grid
from soar.rollout import STOCHASTIC_STEPS
from soar.step import Draws, StepSettings, TextCond, build_points, draw, training_step

pytestmark = pytest.mark.usefixtures("float64_default")  # closed forms in float64

GRID = sigma_grid(1000, 3.0)


def settings(**kw) -> StepSettings:
    return step_settings(**{"lambda_aux": 0.7, "num_rollout_paths": 3, "trajectory_length": 3,
                            "weighting_scheme": "cosmap", "cond_dropout_rate": 0.5, **kw})


class SmallModel(torch.nn.Module):
    """A small differentiable velocity that reads z, sigma, the token embeddings and the pooled embedding."""

    def __init__(self, record: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.pool = torch.nn.Linear(5, 3)
        self.tok = torch.nn.Linear(6, 3)
        self.record, self.calls = record, []

    def forward(self, z, sigma, embeds, pooled):
        if self.record:
            self.calls.append((z.detach().clone(), sigma.clone(), embeds.clone(), pooled.clone()))
        s = sigma.reshape(-1, 1, 1, 1)
        text = self.pool(pooled) + self.tok(embeds).mean(1)
        return self.conv(torch.tanh(z)) * (1 + s) + text[:, :, None, None] * s


def problem(b: int, t: list[float] | None, s: StepSettings, seed: int = 0):
    """Latents, prompts and the step's draws (t overridden when given, so t1 = 0 cases are present)."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(b, 3, 4, 4, generator=g)
    cond = TextCond(torch.randn(b, 2, 6, generator=g), torch.randn(b, 5, generator=g))
    uncond = TextCond(torch.randn(1, 2, 6, generator=g), torch.randn(1, 5, generator=g))
    d = draw(z0, s, g)
    if t is not None:
        d = dataclasses.replace(d, t=torch.tensor(t))
    return z0, cond, uncond, d


def grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def run_step(model, z0, cond, uncond, s, d, **kw):
    model.zero_grad()
    out = training_step(model, z0, cond, uncond, GRID, s, None, backward=lambda loss: loss.backward(), draws=d, **kw)
    return out, grads(model)


def per_point_loss(model, z0, cond, uncond, s: StepSettings, d: Draws) -> torch.Tensor:
    """docs/method.md's training step, sample by sample and point by point: one forward per point, CFG as
    two forwards."""
    n_steps, floor, cap = s.soar.num_sampling_steps, GRID[-2], float(GRID[1])
    main, aux = [], []
    for i in range(z0.shape[0]):
        x0, z1, t = z0[i:i + 1], d.z1[i:i + 1], d.t[i:i + 1]
        c_e, c_p = (uncond.embeds, uncond.pooled) if d.drop[i] else (cond.embeds[i:i + 1], cond.pooled[i:i + 1])
        sigma0 = sigma_from_t(t, GRID, allow_zero=False)
        z_t0 = (1 - sigma0) * x0 + sigma0 * z1
        pred = model(z_t0, sigma0, c_e, c_p)
        main.append(loss_weight(s.flow.weighting_scheme, sigma0) * ((pred - (z1 - x0)) ** 2).mean())
        t1 = (t - 1 / n_steps).clamp_min(0)
        sigma1 = sigma_from_t(t1, GRID, allow_zero=True)
        with torch.no_grad():
            v_c, v_u = model(z_t0, sigma0, c_e, c_p), model(z_t0, sigma0, uncond.embeds, uncond.pooled)
            v = v_u + s.soar.cfg_scale_sampling * (v_c - v_u)
            paths = [(z_t0 + (sigma1 - sigma0) * v, d.u_aux[0, i])]
            if t1 > 0:
                step = STOCHASTIC_STEPS[s.soar.sde_rollout_type]
                for m in range(1, s.soar.num_rollout_paths):
                    z_m = step(z_t0, v, sigma0, sigma1, d.eps[m - 1, i:i + 1], s.soar.sde_noise_scale, sigma_cap=cap)
                    paths.append((z_m, d.u_aux[m, i]))
        lo = torch.maximum(sigma1, floor)
        hi = torch.ones(1) if s.soar.sigma_upper_ratio is None else (s.soar.sigma_upper_ratio * sigma0).clamp(max=1)
        hi = torch.maximum(hi, lo)
        for z_rolled, u in paths:
            for k in range(s.soar.trajectory_length):
                sig = lo + u[k] * (hi - lo)
                alpha = (sig - sigma1) / (1 - sigma1)
                z_aux = (1 - alpha) * z_rolled + alpha * z1
                v_corr = (z_aux - x0) / sig
                pred = model(z_aux, sig, c_e, c_p)
                aux.append(loss_weight(s.flow.weighting_scheme, sig) * ((pred - v_corr) ** 2).mean())
    lam = s.lambda_aux
    return ((sum(main) + lam * sum(aux)) / max(len(main) + lam * len(aux), 1)).reshape(())


T_MIXED = [0.01, 0.4, 0.9995, 0.02, 0.7, 0.3]  # N = 40: samples 0, 3 sit at t1 = 0; sample 2 at sigma0 = 1


@pytest.mark.parametrize(("kind", "ratio"), [("flow_sde", None), ("cps", 1.5), ("sde", None), ("simple", 1.2)])
def test_batched_forward_equals_per_point_loop(kind, ratio):
    s = settings(sde_rollout_type=kind, sigma_upper_ratio=ratio)
    z0, cond, uncond, d = problem(6, T_MIXED, s)
    assert 0 < int(d.drop.sum()) < 6  # per-sample dropout at rate 0.5 is exercised
    model = SmallModel(record=True)
    out, g_batched = run_step(model, z0, cond, uncond, s, d)
    assert len(model.calls) == 2  # one rollout forward (cond + uncond), one forward for all main + aux points
    assert model.calls[1][0].shape[0] == 6 + 3 * (6 + 2 * 4)  # T (B + (M - 1) * #{t1 > 0})
    model.record = False
    model.zero_grad()
    ref = per_point_loss(model, z0, cond, uncond, s, d)
    ref.backward()
    torch.testing.assert_close(out["loss"], ref.detach(), rtol=1e-6, atol=1e-9)
    for gb, gr in zip(g_batched, grads(model), strict=True):
        torch.testing.assert_close(gb, gr, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk", [1, 5, 16, 200])
def test_aux_microbatch_chunks_change_nothing(chunk):
    s = settings()
    z0, cond, uncond, d = problem(6, T_MIXED, s)
    model = SmallModel()
    whole, g_whole = run_step(model, z0, cond, uncond, s, d)
    state = {"inside": False, "backward": []}

    @contextmanager
    def no_sync():
        state["inside"] = True
        yield
        state["inside"] = False

    def backward(loss):
        state["backward"].append(state["inside"])
        loss.backward()

    model.zero_grad()
    chunked = StepSettings(s.flow, dataclasses.replace(s.soar, aux_microbatch=chunk))
    out = training_step(model, z0, cond, uncond, GRID, chunked, None, backward=backward, draws=d, no_sync=no_sync)
    n = 6 + 3 * (6 + 2 * 4)
    assert state["backward"] == [True] * (math.ceil(n / chunk) - 1) + [False]
    torch.testing.assert_close(out["loss"], whole["loss"])
    for a, b in zip(grads(model), g_whole, strict=True):
        torch.testing.assert_close(a, b)


def test_condition_dropout_is_per_sample_and_reaches_every_forward():
    s = settings(num_rollout_paths=1, trajectory_length=2, cond_dropout_rate=0.5)
    b, length = 8, 2
    z0, cond, uncond, d = problem(b, None, s, seed=3)
    drop = d.drop
    assert 0 < int(drop.sum()) < b
    model = SmallModel(record=True)
    training_step(model, z0, cond, uncond, GRID, s, None, backward=lambda loss: loss.backward(), draws=d)
    (_, _, roll_e, roll_p), (_, _, train_e, train_p) = model.calls

    def expected(owner: torch.Tensor):
        e = torch.where(drop[owner, None, None], uncond.embeds, cond.embeds[owner])
        p = torch.where(drop[owner, None], uncond.pooled, cond.pooled[owner])
        return e, p

    e, p = expected(torch.arange(b))  # rollout: the (dropped) prompts, then the empty prompt for all
    torch.testing.assert_close(roll_e, torch.cat([e, uncond.embeds.expand(b, -1, -1)]))
    torch.testing.assert_close(roll_p, torch.cat([p, uncond.pooled.expand(b, -1)]))
    owner = torch.cat([torch.arange(b), torch.arange(b).repeat_interleave(length)])  # main, then T per sample
    e, p = expected(owner)
    torch.testing.assert_close(train_e, e)
    torch.testing.assert_close(train_p, p)
    for row in range(b):  # and the dropped rows really differ from their own prompts
        assert torch.equal(train_p[row], uncond.pooled[0]) == bool(drop[row])


def test_metrics_in_closed_form():
    """z0 = 0 and v = z / sigma + 1: the perfect velocity (z1) plus a constant offset c = 1.

    Then z'1 = sigma1 z1 + (sigma1 - sigma0) c, z_sigma' = sigma' z1 + (1 - alpha)(sigma1 - sigma0) c,
    so v_corr - z1 = (1 - alpha)(sigma1 - sigma0) c / sigma' (the drift), and the model's error is c at
    every main and auxiliary point: loss_main = loss_aux = loss = 1.
    """
    s = settings(num_rollout_paths=1, trajectory_length=2, weighting_scheme="logit_normal", cond_dropout_rate=0.0)
    t = torch.tensor([0.01, 0.5, 0.8, 0.3])
    z0 = torch.zeros(4, 3, 4, 4)
    _, cond, uncond, d = problem(4, t.tolist(), s)
    d = dataclasses.replace(d, u_aux=torch.tensor([[[0.0, 0.5], [0.25, 0.75], [0.1, 0.9], [0.0, 1.0]]]))

    def velocity(z, sigma, embeds, pooled):
        return z / sigma.reshape(-1, 1, 1, 1) + 1.0

    out = training_step(velocity, z0, cond, uncond, GRID, s, None, backward=lambda loss: None, draws=d)
    sigma0 = sigma_from_t(t, GRID, allow_zero=False)
    sigma1 = sigma_from_t((t - 0.025).clamp_min(0), GRID, allow_zero=True)
    lo = torch.maximum(sigma1, GRID[-2])[:, None]
    sig = lo + d.u_aux[0] * (1 - lo)
    alpha = (sig - sigma1[:, None]) / (1 - sigma1[:, None])
    drift = ((1 - alpha) * (sigma0 - sigma1)[:, None] / sig).mean()
    assert float(out["frac_t0"]) == 0.25
    torch.testing.assert_close(out["drift"], drift, rtol=1e-10, atol=0)
    assert float(out["aux_per_sample"]) == 2
    for key in ("loss", "loss_main", "loss_aux"):
        assert float(out[key]) == pytest.approx(1.0, rel=1e-10)


def test_sft_has_no_rollout_forward():
    s = settings(lambda_aux=0.0)
    z0, cond, uncond, d = problem(4, None, s)
    model = SmallModel(record=True)
    out = training_step(model, z0, cond, uncond, GRID, s, None, backward=lambda loss: loss.backward(), draws=d)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 4
    assert float(out["aux_per_sample"]) == 0 and "drift" not in out


# ---- data parallel: the gradient must not depend on the number of processes ----

DDP_T = [0.01, 0.02, 0.5, 0.9]  # rank 0 gets both t1 = 0 samples: 4 aux points against rank 1's 12


def ddp_settings() -> StepSettings:
    return settings(num_rollout_paths=3, trajectory_length=2, aux_microbatch=4)  # 2 chunks on rank 0, 4 on 1


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        s = ddp_settings()
        z0, cond, uncond, d = problem(4, DDP_T, s)  # the same global batch on every rank
        model = SmallModel()
        ddp = DistributedDataParallel(model)
        calls = [0]

        def counting_hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)

        def reduce_counts(c: torch.Tensor) -> torch.Tensor:
            c = c.clone()
            dist.all_reduce(c)
            return c

        rows = torch.arange(rank * 2, rank * 2 + 2)
        out = training_step(ddp, z0[rows], cond.take(rows), uncond, GRID, s, None,
                            backward=lambda loss: loss.backward(), reduce_counts=reduce_counts, world_size=world,
                            draws=d.take(rows), no_sync=ddp.no_sync)
        torch.save({"grads": grads(model), "loss": out["loss"], "allreduce_calls": calls[0]},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_one_process_gradient(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    s = ddp_settings()
    z0, cond, uncond, d = problem(4, DDP_T, s)
    model = SmallModel()
    ref, g_ref = run_step(model, z0, cond, uncond, s, d)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / 2, ref["loss"], rtol=1e-10, atol=0)
    for r in ranks:
        assert r["allreduce_calls"] == 1  # one bucket, all-reduced once: every chunk but the last ran under no_sync
        for g, gr in zip(r["grads"], g_ref, strict=True):
            torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)
    # the counts really differ between ranks (so local normalisation would give another gradient)
    pts = [build_points(model, z0[rows], cond.take(rows), uncond, GRID, s, d.take(rows))
           for rows in (torch.arange(0, 2), torch.arange(2, 4))]
    assert [int(p.is_aux.sum()) for p in pts] == [4, 12]
