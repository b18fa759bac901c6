"""Time one SOAR step on the tiny model: the batched step against per-point loops, plus SFT (CPU).

    python benchmarks/soar_step.py [--batch 8] [--trajectory-length 6] [--paths 1] [--reps 5] [--threads N]

All variants share the draws and the rollout (``build_points``: one CFG forward of 2B rows under
no_grad); they differ only in how the B main and B·M·T auxiliary points reach the model:

- batched:   ``soar.step.training_step`` (one forward + backward over all points);
- per-index: the released code's loop: the main batch, then one forward of B points per auxiliary
             index k (T forwards), losses summed, one backward;
- per-point: one forward per point (B + B·M·T forwards), losses summed, one backward;
- sft:       ``training_step`` with lambda_aux = 0 (main points only, no rollout).

The loops are written here only; the product never loops over points. Prints seconds per step
(median of ``--reps`` after ``--warmup`` untimed steps; the variants interleave so background load
hits all alike) and the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from pipeline.config import parse_config, read_params
from soar.flow import loss_weight, sigma_grid, weighted_mse
from soar.models.tiny import NUM_TRAIN_TIMESTEPS, TinyModelConfig, build_transformer
from soar.objective import loss_denominator
from soar.step import StepSettings, TextCond, build_points, draw, training_step
from soar.velocity import transformer_velocity

ROOT = Path(__file__).resolve().parents[1]


def settings(params: dict, batch_paths: int, length: int) -> StepSettings:
    """The step of ``params`` (train and soar sections) with M = ``batch_paths`` and T = ``length``, one chunk."""
    cfg = parse_config(params)
    return StepSettings(cfg.train, dataclasses.replace(cfg.soar, num_rollout_paths=batch_paths,
                                                       trajectory_length=length, aux_microbatch=None))


def looped_step(velocity, z0, cond, uncond, grid, s: StepSettings, gen, groups: str) -> torch.Tensor:
    """The same objective as ``training_step`` (one process), with the training forwards in a Python loop.

    ``groups="index"``: the main batch, then for each auxiliary index k all points with that k (B per
    path; with M = 1 the released code's T forwards of B); ``groups="point"``: every point alone.
    """
    b = z0.shape[0]
    pts = build_points(velocity, z0, cond, uncond, grid, s, draw(z0, s, gen))
    n = pts.owner.numel()
    if groups == "point":
        chunks = [torch.tensor([i]) for i in range(n)]
    else:  # aux rows are ordered (path, sample, k), k fastest: row b + j has k = j mod T
        aux = torch.arange(b, n)
        chunks = [torch.arange(b)] + [aux[k::s.soar.trajectory_length] for k in range(s.soar.trajectory_length)]
    total = 0.0
    for idx in chunks:
        c = pts.cond.take(pts.owner[idx])
        pred = velocity(pts.z[idx], pts.sigma[idx], c.embeds, c.pooled)
        point = weighted_mse(pred, pts.target[idx], loss_weight(s.flow.weighting_scheme, pts.sigma[idx]))
        total = total + torch.where(pts.is_aux[idx], s.lambda_aux, 1.0).mul(point).sum()
    denom = loss_denominator(torch.tensor(float(b)), torch.tensor(float(n - b)), s.lambda_aux)
    loss = total / denom
    loss.backward()
    return loss.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--trajectory-length", type=int, default=6)
    ap.add_argument("--paths", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--skip-per-point", action="store_true", help="skip the slowest variant")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = read_params(ROOT / "params.yaml")
    tiny = params["model"]["tiny"]
    arch = TinyModelConfig(**tiny)
    transformer = build_transformer(arch, seed=0).train()
    velocity = transformer_velocity(transformer)
    grid = sigma_grid(NUM_TRAIN_TIMESTEPS, arch.shift).float()
    s = settings(params, args.paths, args.trajectory_length)
    g = torch.Generator().manual_seed(0)
    b = args.batch
    z0 = torch.randn(b, 3, arch.sample_size, arch.sample_size, generator=g)
    cond = TextCond(torch.randn(b, arch.text_max_length, arch.joint_attention_dim, generator=g),
                    torch.randn(b, arch.pooled_projection_dim, generator=g))
    uncond = TextCond(torch.randn(1, arch.text_max_length, arch.joint_attention_dim, generator=g),
                      torch.randn(1, arch.pooled_projection_dim, generator=g))

    def batched(gen):
        return training_step(velocity, z0, cond, uncond, grid, s, gen, backward=lambda loss: loss.backward())["loss"]

    def sft(gen):
        return training_step(velocity, z0, cond, uncond, grid, StepSettings(s.flow, None), gen,
                             backward=lambda loss: loss.backward())["loss"]

    variants = {"batched": batched,
                "per-index": lambda gen: looped_step(velocity, z0, cond, uncond, grid, s, gen, "index"),
                "sft": sft}
    if not args.skip_per_point:
        variants["per-point"] = lambda gen: looped_step(velocity, z0, cond, uncond, grid, s, gen, "point")

    # same draws -> same loss: the loops compute the same objective
    losses = {k: float(f(torch.Generator().manual_seed(1))) for k, f in variants.items() if k != "sft"}
    transformer.zero_grad(set_to_none=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.warmup + args.reps):
        for name, fn in variants.items():
            tic = time.perf_counter()
            fn(torch.Generator().manual_seed(100 + rep))
            elapsed = time.perf_counter() - tic
            transformer.zero_grad(set_to_none=True)
            if rep >= args.warmup:
                times[name].append(elapsed)
    n_aux = b * args.paths * args.trajectory_length  # at most; fewer when some t1 = 0 and M > 1
    print(f"tiny model {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M params, batch {b}, "
          f"T={args.trajectory_length}, M={args.paths} (up to {b} main + {n_aux} aux points), "
          f"torch threads {torch.get_num_threads()}, {args.reps} reps after {args.warmup} warm-up")
    print("loss with the same draws: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        spread = f"min {min(times[name]):.3f} max {max(times[name]):.3f}"
        print(f"{name:>10}: {t:.3f} s/step (median; {spread})")
    for name in ("per-index", "per-point"):
        if name in med:
            print(f"{name} / batched = {med[name] / med['batched']:.2f}x")
    print(f"batched SOAR / SFT = {med['batched'] / med['sft']:.2f}x")


if __name__ == "__main__":
    main()
