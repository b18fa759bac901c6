"""Stages of the multi-seed study (study/dvc.yaml; pipeline/study.py says what a run is).

    python -m stages.study base          # evaluate the base model (scores at every study.sampling_steps, drift)
    python -m stages.study sft-s0        # train + evaluate one seed run (sft-s{seed}, soar-s{seed}, grpo-s{seed})
    python -m stages.study sweep-l0.5-T1 # one SOAR sweep cell (lambda_aux 0.5, trajectory_length 1)

The report is ``stages/study_report.py``.
"""

from __future__ import annotations

import json
import sys

from pipeline.study import run_variant as run_one
from pipeline.study_variants import find_variant, variant_config
from stages.common import load, run_main

PARAMS = ("data", "model", "train", "soar", "grpo", "sample", "score", "study", "mlflow")


def main(name: str) -> None:
    cfg = load(PARAMS)
    variant = find_variant(cfg, name)
    ran = variant_config(cfg, variant)
    metrics = run_one(cfg, variant, {s: getattr(ran, s) for s in PARAMS if getattr(ran, s) is not None})
    print(f"study {name}: " + json.dumps({k: round(v, 4) for k, v in metrics.items() if "/" not in k}))


if __name__ == "__main__":
    run_main("study", main, sys.argv[1] if len(sys.argv) > 1 else "")
