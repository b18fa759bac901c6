"""Stage `dynamics@{sft,soar,grpo}`: reward-vs-step curves from the training run's snapshots.

    python -m stages.dynamics soar
    accelerate launch --config_file pipeline/launch/multi_gpu.yaml --num_processes 8 -m stages.dynamics soar

Every process samples its share of each snapshot's images (``pipeline.dynamics``); then the other
processes leave and the main process scores each step, writes ``{dynamics.out_dir}/{method}.csv`` (step 0 = the
arm's starting model: the base model, or SFT / SOAR for GRPO started from them) and logs each row to MLflow as
``dynamics/<metric>`` at that step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState

from pipeline.arms import METHODS, start_model
from pipeline.curves import write_curve
from pipeline.dynamics import base_point, sample_snapshots, score_snapshots
from pipeline.evaluation import build_scorers, scorer_names
from pipeline.tracking import stage_run
from soar.models.geometry import check_side, pixel_multiple
from soar.snapshots import SNAPSHOT_DIR, list_snapshots, missing_steps
from stages.common import declared, load, run_main

PARAMS = ("model", "sample", "score", "dynamics", "mlflow")
METHOD_PARAMS = {"sft": PARAMS, "soar": PARAMS, "grpo": (*PARAMS, "grpo")}  # GRPO's start: grpo.init_from


def main(method: str) -> None:
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    params = METHOD_PARAMS[method]
    cfg = load(params)
    check_side(cfg.sample.resolution, pixel_multiple(cfg.model.base_path), "sample.resolution", cfg.model.base_path)
    state = PartialState(cpu=not torch.cuda.is_available())
    snapshots = list_snapshots(Path(cfg.model.models_dir) / method)
    gaps = missing_steps([step for step, _ in snapshots])
    if gaps:
        raise ValueError(f"{Path(cfg.model.models_dir) / method / SNAPSHOT_DIR}: the snapshots of steps {gaps} are "
                         "missing, the curve would have a gap; rerun train@" + method)
    root = Path(cfg.dynamics.out_dir) / method
    if not snapshots and state.is_main_process:
        print(f"dynamics {method}: no snapshots under {Path(cfg.model.models_dir) / method / SNAPSHOT_DIR} "
              "(snapshot_steps: 0?); the curve has step 0 (the starting model) only", flush=True)
    with stage_run(cfg.mlflow, "dynamics", method, declared(cfg, params), main_process=state.is_main_process) as run:
        tic = time.perf_counter()
        sample_snapshots(state, method, snapshots, root, cfg)
        seconds = time.perf_counter() - tic
        state.destroy_process_group()
        if not state.is_main_process:
            return  # scoring runs on the main process alone
        steps = [step for step, _ in snapshots]
        needed = bool(steps) or cfg.dynamics.max_prompts_per_set is not None  # step 0 alone may need them too
        scorers = build_scorers(cfg.score, scorer_names(cfg.score.scorers)) if needed else None
        start = start_model(method, cfg.grpo.init_from if cfg.grpo else None)
        rows = [{"step": 0, **base_point(Path(cfg.score.out_dir) / start, cfg, scorers, start)}]
        rows += score_snapshots(scorers, cfg, method, root, steps)
        curve = Path(cfg.dynamics.out_dir) / f"{method}.csv"
        write_curve(curve, rows)
        for row in rows:
            run.log_metrics({f"dynamics/{k}": v for k, v in row.items() if k != "step"}, step=int(row["step"]))
        run.log_metrics({"snapshots": len(steps), "sampling_seconds": seconds})
        run.log_artifact(curve)
    print(f"dynamics {method}: steps {[r['step'] for r in rows]} -> {curve}", flush=True)


if __name__ == "__main__":
    run_main("dynamics", main, sys.argv[1] if len(sys.argv) > 1 else "")
