"""The multi-seed study: SFT, SOAR and GRPO from one base and data, several seeds, a SOAR sweep.

A *variant* is one configuration and seed. ``run_variant`` trains it from ``model.base_path`` on the
prepared data with the ``train`` / ``soar`` settings, or with Flow-GRPO on ``grpo.prompts`` (seed and
swept keys replaced; validation, snapshots and checkpoints off), then evaluates
the trained transformer exactly like every other variant:

* the prompt sets of ``sample`` are sampled in memory (same seeds, CFG and resolution as the sample
  stage) at ``sample.num_inference_steps`` and, for base and seed runs, at each ``study.sampling_steps``,
  and scored with ``score.scorers`` (metric names as the score stage; other step counts as
  ``steps{n}/{metric}``);
* the exposure-bias meter (``soar.exposure``) on the held-out images: drift after k = 1..K sampler
  steps from true states at ``study.drift_starts``, with the evaluation CFG (``drift/...`` metrics).

Everything goes to ``{study.out_dir}/runs/{name}/metrics.json`` and to one MLflow run per variant,
nested under its configuration's group run (``pipeline.tracking.group_run``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from pipeline.evaluation import build_scorers, score_entries, scorer_names, set_metrics
from pipeline.grpo import run_grpo
from pipeline.sample_sets import NEGATIVE_PROMPT, fixed_batches, open_bundle, set_entries
from pipeline.study_variants import BASE, Variant, variant_config
from pipeline.tracking import group_run, stage_run
from pipeline.training import post_train
from soar.data.dataset import ImageCaptionDataset, collate
from soar.data.jsonl import read_clean_records
from soar.euler import sample, sampling_sigmas
from soar.exposure import cfg_velocity_fn, drift_curves, standstill_curves
from soar.models.bundle import SD3Bundle


def sample_set(bundle: SD3Bundle, cfg: Config, set_name: str, steps: int) -> tuple[np.ndarray, list[dict]]:
    """Images ``[N, H, W, 3]`` (uint8) and entries of one prompt set, in memory: the sample stage's entries,
    seeds and fixed batches (``pipeline.sample_sets``), at ``steps`` Euler steps."""
    s = cfg.sample
    ps = s.prompt_sets[set_name]
    entries = set_entries(Path(set_name), ps.path, ps.format, ps.images_per_prompt, s.seed)
    images = [sample(bundle, [e["prompt"] for e in b.entries], [e["seed"] for e in b.entries], steps=steps,
                     guidance_scale=s.guidance_scale, resolution=s.resolution, negative_prompt=NEGATIVE_PROMPT)
              for b in fixed_batches(set_name, Path(set_name), entries, s.batch_size)]
    return np.concatenate(images), entries


def score_metrics(cfg: Config, scorers: dict, sets: dict[str, tuple[np.ndarray, list[dict]]]) -> dict[str, float]:
    """Metrics of in-memory sampled sets, scored and named as the score stage does (``pipeline.evaluation``)."""
    records = {name: score_entries(scorers, names, lambda lo, hi, im=sets[name][0]: im[lo:hi], sets[name][1],
                                   cfg.score.batch_size, f"score {name}")
               for name, names in cfg.score.scorers.items()}
    return set_metrics(scorers, cfg.score.scorers, records)


def evaluate(bundle: SD3Bundle, cfg: Config, scorers: dict, steps_list: list[int]) -> dict[str, float]:
    """Scores at every step count; ``sample.num_inference_steps`` unprefixed, others as ``steps{n}/...``."""
    metrics: dict[str, float] = {}
    for steps in steps_list:
        sets = {name: sample_set(bundle, cfg, name, steps) for name in cfg.score.scorers}
        found = score_metrics(cfg, scorers, sets)
        prefix = "" if steps == cfg.sample.num_inference_steps else f"steps{steps}/"
        metrics.update({prefix + k: v for k, v in found.items()})
    return metrics


def heldout(bundle: SD3Bundle, cfg: Config) -> tuple[torch.Tensor, list[str]]:
    """Clean latents ``z0 [B, C, h, w]`` (posterior means) and captions of the held-out images."""
    st = cfg.study
    records = read_clean_records(st.heldout_jsonl)[:st.heldout_images]
    sizes = sorted({r.bucket for r in records})
    if len(sizes) != 1:
        raise ValueError(f"{st.heldout_jsonl}: the meter needs one image size, found {sizes}")
    batch = collate([ImageCaptionDataset(records, st.heldout_image_dir).pixel_item(i) for i in range(len(records))])
    mean, _ = bundle.codec.moments(batch["pixels"].to(bundle.device))
    return mean.float(), batch["captions"]


@torch.no_grad()
def meter(bundle: SD3Bundle, cfg: Config) -> dict[str, float]:
    """The drift curves of ``bundle.transformer`` as metrics ``drift/s{sigma:.2f}/k{k}`` (+ relative, and the
    mean over starts per k), at the evaluation sampler's schedule and CFG."""
    st, s = cfg.study, cfg.sample
    z0, captions = heldout(bundle, cfg)
    z1 = torch.randn(z0.shape, generator=torch.Generator().manual_seed(st.drift_seed)).to(z0)
    embeds, pooled = bundle.encode_prompts([*captions, NEGATIVE_PROMPT])
    n = len(captions)
    velocity = cfg_velocity_fn(bundle.transformer.eval(), embeds[:n], pooled[:n], embeds[n:], pooled[n:],
                               s.guidance_scale)
    sigmas = sampling_sigmas(bundle, s.num_inference_steps).to(z0)
    curves = drift_curves(velocity, z0, z1, sigmas, list(st.drift_starts), st.drift_max_k).cpu()
    still = standstill_curves(z0, z1, sigmas, list(st.drift_starts), st.drift_max_k).cpu()
    metrics: dict[str, float] = {}
    for p, i in enumerate(st.drift_starts):
        for k in range(st.drift_max_k):
            if not math.isnan(curves[p, k]):
                metrics[f"drift/s{float(sigmas[i]):.2f}/k{k + 1}"] = float(curves[p, k])
                metrics[f"drift_rel/s{float(sigmas[i]):.2f}/k{k + 1}"] = float(curves[p, k] / still[p, k])
    for k in range(st.drift_max_k):
        col = curves[:, k][~torch.isnan(curves[:, k])]
        if len(col):
            metrics[f"drift/mean/k{k + 1}"] = float(col.mean())
    return metrics


def train_variant(cfg: Config, variant: Variant, out: Path, run) -> None:
    """Train ``variant`` from the base into ``out/transformer`` (logging to ``run``); SFT = no soar section."""
    v = variant_config(cfg, variant)
    if variant.method == "grpo":
        run_grpo(v, out, stage="study", run=run)
    else:
        post_train(v, variant.method, out, stage="study", run=run)


def run_variant(cfg: Config, variant: Variant, params: dict) -> dict[str, float]:
    """Train (unless base) and evaluate ``variant``; writes ``{out_dir}/runs/{name}/metrics.json``.

    ``params``: what the MLflow run records (the ``variant_config`` sections, so each run shows its own seed).
    """
    out = Path(cfg.study.out_dir) / "runs" / variant.name
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tags = {"group": variant.group, "study_run": variant.name, "seed": str(variant.seed)}
    parent = group_run(cfg.mlflow, cfg.study.experiment, variant.group)
    with stage_run(cfg.mlflow, "study", variant.method, params, experiment=cfg.study.experiment,
                   run_name=variant.name, parent_run_id=parent, tags=tags) as run:
        transformer = None
        if variant.method != BASE:
            train_variant(cfg, variant, out / "model", run)
            transformer = out / "model" / "transformer"
        bundle = open_bundle(cfg, transformer, device)  # as sample@
        steps = [cfg.sample.num_inference_steps]
        if not variant.sweep:
            steps += [n for n in cfg.study.sampling_steps if n != cfg.sample.num_inference_steps]
        scorers = build_scorers(cfg.score, scorer_names(cfg.score.scorers))
        metrics = evaluate(bundle, cfg, scorers, steps)
        metrics.update(meter(bundle, cfg))
        run.log_metrics(metrics)
    if transformer is not None:  # only the metrics are kept (the run can be remade from its seed)
        shutil.rmtree(out / "model")
    record = {"name": variant.name, **dataclasses.asdict(variant), "group": variant.group, "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return metrics
