"""Stage `score@{base,sft,soar}`: per-image scores (JSONL) and per-set metrics (DVC metrics).

Every scorer named in ``score.scorers`` is built once, from ``score.*`` (weights from
``score.checkpoints``), and applied to its prompt sets in batches of ``score.batch_size``; metric
names: ``pipeline.evaluation``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.evaluation import build_scorers, score_samples, scorer_names
from pipeline.tracking import stage_run
from stages.common import declared, load, run_main

PARAMS = ("sample", "score", "mlflow")


def main(model: str) -> None:
    cfg = load(PARAMS)
    sc = cfg.score
    out = Path(sc.out_dir) / model
    out.mkdir(parents=True, exist_ok=True)
    scorers = build_scorers(sc, scorer_names(sc.scorers))
    with stage_run(cfg.mlflow, "score", model, declared(cfg, PARAMS)) as run:
        metrics, rows = score_samples(scorers, sc.scorers, Path(cfg.sample.out_dir) / model, sc.batch_size, model)
        (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"score {model}: {json.dumps(metrics, sort_keys=True)}")
        run.log_metrics(metrics)
        run.log_artifact(out / "scores.jsonl")


if __name__ == "__main__":
    run_main("score", main, sys.argv[1] if len(sys.argv) > 1 else "")
