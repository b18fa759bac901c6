"""Training dynamics: every snapshot of a post-training run sampled and scored like the final models.

For each snapshot ``{models_dir}/{method}/snapshots/step-{N:06d}/transformer`` (``soar.snapshots``), in
step order, the evaluation prompt sets are sampled exactly as the sample stage does (``pipeline.sample_sets``:
same seeds, steps, CFG, batches; on any number of processes, resumable) into
``{dynamics.out_dir}/{method}/step-{N:06d}/{set}/`` and scored with ``score.scorers``
(``pipeline.evaluation``). ``dynamics.max_prompts_per_set`` keeps that many prompts of each set, evenly
spaced in file order, each with the seed it has in the full set.

The last snapshot holds the trained model's weights (the same bytes as ``{models_dir}/{method}/transformer``),
which the sample stage has sampled with the same settings: those images are copied, not sampled again
(``pipeline.sample_sets``' ``reuse``: only when the recorded weights digest and settings are equal).

Step 0 is the arm's starting model (the base model; for GRPO ``grpo.init_from``), never sampled again: its
``all_metrics.json`` from the score stage when every prompt is evaluated, else its per-image ``scores.jsonl``
records of the kept prompts, aggregated by the same scorers.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from pipeline.evaluation import read_records, score_samples, set_metrics
from pipeline.sample_sets import (
    SetPlan,
    bundle_sampler,
    complete_sets,
    model_digest,
    open_bundle,
    own_settings,
    plan_sets,
    sample_sets,
    sampling_dtype,
)
from soar.models.bundle import SD3Bundle, load_transformer
from soar.progress import Progress
from soar.rewards import Scorer

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"step-\d+")


def step_dir(root: Path, step: int) -> Path:
    """``{root}/step-{step:06d}``: the samples of one snapshot."""
    return root / f"step-{step:06d}"


def remove_stale_steps(root: Path, steps: list[int]) -> list[Path]:
    """Delete the ``step-*`` folders under ``root`` of steps not in ``steps`` (an older run's); returns them."""
    keep = {step_dir(root, s).name for s in steps}
    stale = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.name not in keep] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p)
    return stale


class SnapshotLoader:
    """The base bundle on ``device``, loaded once when first needed; each call swaps in one snapshot's transformer."""

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg, self.device = cfg, device  # cfg: the model and sample sections (pipeline.sample_sets.open_bundle)
        self.bundle: SD3Bundle | None = None

    def __call__(self, transformer: Path) -> SD3Bundle:
        if self.bundle is None:
            self.bundle = open_bundle(self.cfg, transformer, self.device)
        else:
            self.bundle.transformer = None  # free the previous snapshot first
            self.bundle.transformer = load_transformer(transformer).to(self.device, sampling_dtype(self.device))
        return self.bundle

    def release(self) -> None:
        """Drop the bundle (and the accelerator memory it held)."""
        self.bundle = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def sample_snapshots(state, method: str, snapshots: list[tuple[int, Path]], root: Path, cfg
                     ) -> dict[int, dict[str, SetPlan]]:
    """Sample every snapshot's prompt sets under ``root`` (collective); returns ``{step: sets}``.

    The main process first removes step folders of snapshots that no longer exist, and at the end writes
    the indexes. ``cfg``: the config with ``model``, ``sample`` and ``dynamics``.
    """
    plans = {step: plan_sets(cfg.sample, step_dir(root, step), cfg.dynamics.max_prompts_per_set)
             for step, _ in snapshots}
    if state.is_main_process:
        for p in remove_stale_steps(root, list(plans)):
            log.info("dynamics %s: removed %s (no such snapshot now)", method, p)
    state.wait_for_everyone()
    loader = SnapshotLoader(cfg, state.device)
    # one line per snapshot (each is a whole sampling run, with its own lines)
    progress = Progress(f"dynamics {method}", len(snapshots), unit="snapshot", main=state.is_main_process, every=0)
    for step, transformer in snapshots:
        made = sample_sets(state, f"{method}@{step}", plans[step], cfg.sample.batch_size,
                           digest=lambda t=transformer: model_digest(cfg.model.base_path, t),
                           settings=own_settings(cfg.sample, state.device, cfg.model.text_encoder_dtype),
                           load=lambda t=transformer: bundle_sampler(loader(t), cfg.sample),
                           reuse={name: Path(cfg.sample.out_dir) / method / name for name in plans[step]})
        if state.is_main_process:
            complete_sets(plans[step])
        progress.advance(note=f"step {step}: {made} new images")
    loader.release()
    return plans


def base_point(score_dir: Path, cfg, scorers: Mapping[str, Scorer] | None, model: str = "base") -> dict[str, float]:
    """Step 0: the starting model's metrics over the evaluated prompts (see the module doc).

    ``score_dir``: the score stage's folder of that model (``model``: its name); ``scorers`` are needed only when
    ``dynamics.max_prompts_per_set`` is set.
    """
    if cfg.dynamics.max_prompts_per_set is None:
        path = score_dir / "all_metrics.json"  # every metric, as score_snapshots reports them
        if not path.is_file():
            raise FileNotFoundError(f"{model} metrics not found: {path} (run score@{model})")
        return json.loads(path.read_text())
    sets = plan_sets(cfg.sample, score_dir, cfg.dynamics.max_prompts_per_set)  # the evaluated entries
    plan = cfg.score.scorers
    keep = {name: {(e["prompt_index"], e["image_index"]) for e in sets[name][1]} for name in plan}
    return set_metrics(scorers, plan, read_records(score_dir / "scores.jsonl", plan, keep))


def score_snapshots(scorers: Mapping[str, Scorer], cfg, method: str, root: Path, steps: list[int]
                    ) -> list[dict[str, float]]:
    """``{"step": N, metric: value, ...}`` for each sampled step under ``root``."""
    rows = []
    for step in steps:
        metrics, _ = score_samples(scorers, cfg.score.scorers, step_dir(root, step), cfg.score.batch_size,
                                   f"{method}@{step}")
        rows.append({"step": step, **metrics})
    return rows
