"""Time GRPO iterations (sampling with log-probabilities, reward, training) on the tiny default model, CPU.

    python benchmarks/grpo_iteration.py --threads 2 --iterations 3

Builds the default tiny architecture (``model.tiny``) with random weights (time does not depend on the weights),
draws GenEval-format prompts from the tiny world's generator, and runs ``soar.grpo_trainer.train_grpo`` with the
default ``grpo`` settings and the tiny GenEval reward; prints, per iteration, the sampling, reward and training
seconds. The first iteration includes warm-up; the figures to quote are the later ones.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.training import make_accelerator
from soar.data.tiny_world import GRPO_STREAM, TAGS, sample_metadata
from soar.grpo_config import GrpoConfig
from soar.grpo_trainer import train_grpo
from soar.models.bundle import load_bundle
from soar.models.tiny import TinyModelConfig, write_tiny_model
from soar.rewards import build_scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--iterations", type=int, default=3, help="iterations timed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = [sample_metadata(TAGS[i % len(TAGS)], np.random.default_rng([0, GRPO_STREAM, i])) for i in range(96)]
    prompts = [m["prompt"] for m in meta]
    g = GrpoConfig(max_train_steps=2 * args.iterations, snapshot_steps=0, validation_steps=0, log_every=2)
    scorer = build_scorer("geneval", backend="tiny")
    reward_s: list[float] = []

    def reward(images, names, metadata):
        tic = time.perf_counter()
        scores = np.array([r.score for r in scorer.score(images, names, metadata)])
        reward_s.append(time.perf_counter() - tic)
        return scores

    rows, last = [], [time.perf_counter()]

    def log(metrics, step):
        now = time.perf_counter()
        rows.append((step // g.updates_per_iteration, now - last[0], metrics["sampling_s"], sum(reward_s)))
        reward_s.clear()
        last[0] = now

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_model(Path(tmp) / "model", TinyModelConfig(), prompts, seed=0)
        bundle = load_bundle(Path(tmp) / "model")
        last[0] = time.perf_counter()
        train_grpo(bundle, prompts, meta, reward, g, Path(tmp) / "out", make_accelerator("no"), log)
    images = g.images_per_iteration
    print(f"tiny model ({sum(p.numel() for p in bundle.transformer.parameters()) / 1e6:.2f} M parameters), "
          f"{args.threads} threads; per iteration: {g.prompts_per_iteration} prompts x {g.num_image_per_prompt} "
          f"images, {g.num_steps} SDE steps (CFG), {g.train_steps} trained steps, {g.updates_per_iteration} updates")
    print("| iteration | wall s | sampling + reward s | reward s | training s | images/s |")
    print("|---|---|---|---|---|---|")
    for it, wall, sampling, rew in rows:
        print(f"| {it} | {wall:.2f} | {sampling:.2f} | {rew:.2f} | {wall - sampling:.2f} | {images / wall:.1f} |")


if __name__ == "__main__":
    main()
