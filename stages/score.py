"""Stage `score@{base,sft,soar,grpo}`: per-image scores (JSONL) and per-set metrics.

Every scorer named in ``score.scorers`` is built once, from ``score.*`` (weights from
``score.checkpoints``), and applied to its prompt sets in batches of ``score.batch_size``; metric
names: ``pipeline.evaluation``. Writes ``{score.out_dir}/{model}/``:

- ``metrics.json`` (DVC metric): the headline metrics only, one per scorer (``geneval``, ``ocr``, ...), so
  ``dvc metrics show`` / ``dvc exp show`` stay narrow; also the score run's MLflow metrics;
- ``all_metrics.json``: every metric (per-GenEval-tag accuracies, the strict variant), which the report and
  the training dynamics read;
- ``scores.jsonl``: one line per image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.evaluation import build_scorers, score_samples, scorer_names
from pipeline.tracking import stage_run
from stages.common import declared, load, run_main

PARAMS = ("sample", "score", "mlflow")
ALL_METRICS = "all_metrics.json"  # every metric of a model; metrics.json holds the headline ones


def headline(metrics: dict[str, float], scorers: list[str]) -> dict[str, float]:
    """The metrics named after a scorer (``geneval``), or ``{set}/{scorer}`` when a scorer scores several sets."""
    return {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] in scorers}


def main(model: str) -> None:
    cfg = load(PARAMS)
    sc = cfg.score
    out = Path(sc.out_dir) / model
    out.mkdir(parents=True, exist_ok=True)
    names = scorer_names(sc.scorers)
    scorers = build_scorers(sc, names)
    with stage_run(cfg.mlflow, "score", model, declared(cfg, PARAMS)) as run:
        metrics, rows = score_samples(scorers, sc.scorers, Path(cfg.sample.out_dir) / model, sc.batch_size, model)
        main = headline(metrics, names)
        (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / ALL_METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        (out / "metrics.json").write_text(json.dumps(main, indent=2, sort_keys=True) + "\n")
        print(f"score {model}: " + ", ".join(f"{k} {v:.4f}" for k, v in main.items()), flush=True)
        run.log_metrics(main)
        run.log_artifact(out / "scores.jsonl")
        run.log_artifact(out / ALL_METRICS)


if __name__ == "__main__":
    run_main("score", main, sys.argv[1] if len(sys.argv) > 1 else "")
