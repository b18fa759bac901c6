"""Stage `sample@{base,sft,soar,grpo}`: images for every prompt set, one fixed seed per image, on any number
of processes (``stages.sample_ref`` runs the same for a reference model through its own diffusers pipeline).

    python -m stages.sample base                                                  # one process
    accelerate launch --config_file pipeline/launch/multi_gpu.yaml --num_processes 8 -m stages.sample base
    torchrun --nproc_per_node 8 -m stages.sample base                             # same thing

How the images are dealt to the processes, seeded and resumed: ``pipeline.sample_sets``. After every
process is done (a barrier), the main process writes ``index.jsonl`` and the ``metadata.jsonl`` files
and logs to MLflow; the other processes never open a run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import PartialState

from pipeline.arms import BASE, MODELS
from pipeline.grids import captioned_grid
from pipeline.sample_layout import load_image
from pipeline.sample_sets import (
    Sampler,
    SetPlan,
    bundle_sampler,
    complete_sets,
    model_digest,
    open_bundle,
    own_settings,
    plan_sets,
    sample_sets,
)
from pipeline.tracking import stage_run
from soar.models.geometry import check_side, pixel_multiple
from stages.common import declared, load, run_main

PARAMS = ("model", "sample", "mlflow")


def main(model: str) -> None:
    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    cfg = load(PARAMS)
    s = cfg.sample
    check_side(s.resolution, pixel_multiple(cfg.model.base_path), "sample.resolution", cfg.model.base_path)
    state = PartialState(cpu=not torch.cuda.is_available())
    transformer = Path(cfg.model.base_path) / "transformer" if model == BASE else \
        Path(cfg.model.models_dir) / model / "transformer"
    weights = None if model == BASE else transformer  # None: the base folder's own
    run_sampling(cfg, model, state, s.batch_size, digest=lambda: model_digest(cfg.model.base_path, transformer),
                 settings=own_settings(s, state.device, cfg.model.text_encoder_dtype),
                 loader=lambda: bundle_sampler(open_bundle(cfg, weights, state.device), s),
                 params=declared(cfg, PARAMS))


def run_sampling(cfg, model: str, state, batch_size: int, *, digest: Callable[[], str],
                 settings: Callable[[str, list[dict]], dict], loader: Callable[[], Sampler], params: dict) -> None:
    """Sample ``cfg.sample``'s prompt sets into ``{sample.out_dir}/{model}`` (``sample_sets``' arguments), then on
    the main process write the indexes and log the MLflow run ``sample:{model}`` with ``params``."""
    s = cfg.sample
    sets = plan_sets(s, Path(s.out_dir) / model)
    total = sum(len(entries) for _, entries in sets.values())

    with stage_run(cfg.mlflow, "sample", model, params, main_process=state.is_main_process) as run:
        tic = time.perf_counter()
        made = sample_sets(state, model, sets, batch_size, digest=digest, settings=settings, load=loader)
        seconds = time.perf_counter() - tic
        if state.is_main_process:
            finish(run, sets, grid_images=cfg.mlflow.grid_images if cfg.mlflow.log_images else 0)
            run.log_metrics({"images_sampled": made, "sampling_seconds": seconds, "processes": state.num_processes})
            print(f"sample {model}: {made} new images, {total} in all, {seconds:.1f} s on "
                  f"{state.num_processes} process(es)", flush=True)
    state.wait_for_everyone()
    state.destroy_process_group()


def finish(run, sets: dict[str, SetPlan], grid_images: int) -> None:
    """Main process, after all processes: check every image is there, write the indexes, log to MLflow
    (per set: its image count, and a grid of image 0 of its first ``grid_images`` prompts, captioned)."""
    complete_sets(sets)
    for set_name, (set_dir, entries) in sets.items():
        run.log_metrics({f"{set_name}/images": len(entries)})
        if grid_images:
            shown = [e for e in entries if e["image_index"] == 0][:grid_images]
            grid = captioned_grid([load_image(set_dir / e["path"]) for e in shown], [e["prompt"] for e in shown],
                                  title=f"{set_name}: image 0 of the first {len(shown)} prompts")
            with tempfile.TemporaryDirectory() as tmp:
                grid.save(Path(tmp) / f"{set_name}.png")
                run.log_artifact(Path(tmp) / f"{set_name}.png", artifact_path="samples")

if __name__ == "__main__":
    run_main("sample", main, sys.argv[1] if len(sys.argv) > 1 else "")
