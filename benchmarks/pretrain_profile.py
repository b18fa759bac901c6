"""Where the tiny pretraining's time goes: the real loop (``pipeline.training.run_training``) for a few hundred
steps under cProfile, split into data loading, forward, backward, optimiser, EMA and the rest; then the top
operators of forward + backward (``torch.profiler``) and, with ``--compile``, the same forward + backward under
``torch.compile`` (inductor; needs a C++ compiler).

    dvc repro synth                                        # the tiny world the loop reads
    python benchmarks/pretrain_profile.py --threads 1      # 200 steps of params.yaml's pretrain settings
    python benchmarks/pretrain_profile.py --threads 2 --steps 300 --compile
    python benchmarks/pretrain_profile.py --threads 2 --image-memory-mib 0   # decode the images at every step

The model is params.yaml's ``model.tiny`` built from scratch, the settings ``pretrain`` with validation off; MLflow
logs go to a temporary store. Nothing is asserted; figures only.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the phases of one step, each the cumulative time of the function that does it (file suffix, function name)
PHASES = {
    "data loading (DataLoader, JPEG decode)": ("torch/utils/data/dataloader.py", "__next__"),
    "forward (transformer)": ("soar/velocity.py", "velocity"),
    "backward": ("torch/autograd/graph.py", "_engine_run_backward"),
    "optimiser (AdamW, LR schedule)": ("accelerate/optimizer.py", "step"),
    "EMA update": ("soar/ema.py", "update"),
    "gradient clipping": ("accelerate/accelerator.py", "clip_grad_norm_"),
}


def phase_seconds(stats: pstats.Stats) -> dict[str, float]:
    found = dict.fromkeys(PHASES, 0.0)
    for (path, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        for phase, (suffix, function) in PHASES.items():
            if name == function and path.endswith(suffix):
                found[phase] += cumulative
    return found


def forward_backward(model, batch: int, tokens: int, width: int, pooled: int, side: int):
    x = torch.randn(batch, 3, side, side)
    t = torch.rand(batch) * 1000
    e, p = torch.randn(batch, tokens, width), torch.randn(batch, pooled)

    def step() -> None:
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=p, return_dict=False)[0]
        out.square().mean().backward()

    return step


def seconds_per_call(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    tic = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - tic) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps of the profiled loop")
    ap.add_argument("--reps", type=int, default=20, help="timed forward + backward calls per variant")
    ap.add_argument("--compile", action="store_true", help="also time forward + backward under torch.compile")
    ap.add_argument("--image-memory-mib", type=int, default=None,
                    help="decoded images kept in memory (default: params.yaml's data.image_memory_mib; 0 = decode "
                         "every step)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    from pipeline.training import run_training
    from soar.data.jsonl import read_clean_records
    from soar.models.bundle import load_bundle
    from soar.models.tiny import write_tiny_model
    from stages.common import load

    cfg = load(("data", "model", "pretrain", "mlflow"))
    if not Path(cfg.data.jsonl_path).is_file():
        raise SystemExit(f"{cfg.data.jsonl_path} not found: run `dvc repro synth` first")
    t = dataclasses.replace(cfg.pretrain, max_train_steps=args.steps, validation_steps=0, log_every=args.steps)
    memory = cfg.data.image_memory_mib if args.image_memory_mib is None else args.image_memory_mib
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_model(Path(tmp) / "model", cfg.model.tiny, [r.caption for r in
                                                               read_clean_records(cfg.data.jsonl_path)], seed=0)
        bundle = load_bundle(Path(tmp) / "model")
        n = sum(p.numel() for p in bundle.transformer.parameters())
        mlflow_cfg = dataclasses.replace(cfg.mlflow, tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        profiler = cProfile.Profile()
        tic = time.perf_counter()
        profiler.enable()
        run_training(bundle, t, None, cfg.data.jsonl_path, cfg.data.image_dir, Path(tmp) / "model", stage="pretrain",
                     method="base", mlflow_cfg=mlflow_cfg, params={}, image_memory_mib=memory)
        profiler.disable()
        wall = time.perf_counter() - tic
        model = bundle.transformer.train()
    phases = phase_seconds(pstats.Stats(profiler))
    print(f"\npretrain loop: {args.steps} steps of batch {t.train_batch_size}, {n / 1e6:.2f} M parameters, "
          f"{args.threads} thread(s), image memory {memory} MiB: {wall:.1f} s wall ({args.steps / wall:.2f} steps/s, "
          "set-up and saving included)")
    print(f"{'phase':<42} {'ms/step':>8} {'share':>6}")
    for phase, seconds in phases.items():
        print(f"{phase:<42} {1000 * seconds / args.steps:8.1f} {seconds / wall:6.1%}")
    rest = wall - sum(phases.values())
    print(f"{'the rest (set-up, saving, logging, Python)':<42} {1000 * rest / args.steps:8.1f} {rest / wall:6.1%}")

    arch = cfg.model.tiny
    step = forward_backward(model, t.train_batch_size, arch.text_max_length, arch.joint_attention_dim,
                            arch.pooled_projection_dim, arch.sample_size)
    eager = seconds_per_call(step, args.reps)
    print(f"\nforward + backward alone, batch {t.train_batch_size}: eager {1000 * eager:.1f} ms")
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.compile:
        tic = time.perf_counter()
        compiled = torch.compile(model)
        step_c = forward_backward(compiled, t.train_batch_size, arch.text_max_length, arch.joint_attention_dim,
                                  arch.pooled_projection_dim, arch.sample_size)
        step_c()
        first = time.perf_counter() - tic
        fast = seconds_per_call(step_c, args.reps)
        print(f"torch.compile: first call (compiling) {first:.1f} s, then {1000 * fast:.1f} ms per forward + backward "
              f"({eager / fast:.2f}x eager, measured in this run)")


if __name__ == "__main__":
    main()
