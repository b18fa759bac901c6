"""Stage `report`: results.md / results.csv (the paper's table layout), grid.png and dynamics.png (reward vs step).

Its MLflow run, ``results``, is where a reader finds the answer: the results table is the run's description
(its Overview page), the files are its artifacts, and the experiment's saved views (``pipeline.mlflow_views``:
base / SFT / SOAR / GRPO side by side, training curves) are refreshed for the metrics this profile scores. The
links are printed at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.arms import METHODS, MODELS, row_name
from pipeline.curves import read_curve, save_curves_png
from pipeline.intervals import set_intervals
from pipeline.mlflow_views import RESULTS_VIEW, TRAINING_VIEW, install_views, run_url, view_url
from pipeline.report import Row, columns, comparison_grid, results_table, table_rows
from pipeline.tracking import run_group, stage_run
from stages.common import declared, load, run_main
from stages.score import ALL_METRICS

PARAMS = ("references", "train", "grpo", "sample", "score", "dynamics", "mlflow")
OUT = Path("data/report")
FILES = ("results.md", "results.csv", "grid.png", "dynamics.png")
UI = "http://127.0.0.1:5000"  # where the README's `mlflow server` command serves the UI


def read_metrics(score_dir: Path, name: str, rows: list[Row]) -> dict[str, dict[str, float]]:
    """``{model: metrics}`` from each row's ``name`` file under ``score_dir``; a missing one names its stage."""
    out = {}
    for row in rows:
        path = score_dir / row.model / name
        if not path.is_file():
            stage = f"score@{row.model}" if row.model in MODELS else f"score_ref@{row.model}"
            raise FileNotFoundError(f"metrics not found: {path} (run {stage})")
        out[row.model] = json.loads(path.read_text())
    return out


def read_intervals(score_dir: Path, rows: list[Row]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{model: {metric: 95 % interval}}`` from each row's ``scores.jsonl`` (``pipeline.intervals``)."""
    return {r.model: set_intervals([json.loads(line) for line in (score_dir / r.model / "scores.jsonl").open()])
            for r in rows}


def description(title: str, metrics: dict[str, dict[str, float]], headline: list[str], rows: list[Row],
                intervals: dict[str, dict[str, tuple[float, float]]]) -> str:
    """The results run's description: the headline table first (the Overview shows the first lines until
    "Show more"), then the title, the other metrics' table and where the rest is."""
    main, _ = results_table({m: {k: v[k] for k in headline if k in v} for m, v in metrics.items()}, rows, intervals)
    others = {m: {k: x for k, x in v.items() if k not in headline} for m, v in metrics.items()}
    rest = (f"Per GenEval tag and the other metrics:\n\n{results_table(others, rows, intervals)[0]}\n"
            if any(others.values()) else "")
    return (f"{main}\n**{title}**, run group `{run_group()}`.\n\n{rest}"
            "Artifacts: `results.md` / `results.csv` (both tables in one), `grid.png` (the same prompts and seeds for "
            "every model), `dynamics.png` (reward vs training step of each arm). Views of this experiment: *base / "
            "SFT / SOAR / GRPO* (the score runs side by side), *training curves*.\n")

def main() -> None:
    cfg = load(PARAMS)
    rows = table_rows(cfg.references, cfg.train.max_train_steps, cfg.grpo.max_train_steps, cfg.grpo.init_from)
    score_dir = Path(cfg.score.out_dir)
    metrics = read_metrics(score_dir, ALL_METRICS, rows)
    headline = columns(read_metrics(score_dir, "metrics.json", rows))  # the scorers' own metrics, paper order
    intervals = read_intervals(score_dir, rows)
    md, csv_text = results_table(metrics, rows, intervals)
    OUT.mkdir(parents=True, exist_ok=True)
    tiny = cfg.score.geneval_backend == "tiny"  # the tiny world's exact detector: its metrics are the tiny world's
    title = f"Results{' (tiny-world metrics; see README)' * tiny}, each with its 95 % interval"
    (OUT / "results.md").write_text(f"# {title}\n\n" + md)
    (OUT / "results.csv").write_text(csv_text)
    grid = comparison_grid(Path(cfg.sample.out_dir), list(cfg.sample.prompt_sets), cfg.sample.grid_prompts,
                           [r.model for r in rows], [r.label for r in rows])
    grid.save(OUT / "grid.png")
    curves = {m: read_curve(Path(cfg.dynamics.out_dir) / f"{m}.csv") for m in METHODS}
    save_curves_png(curves, OUT / "dynamics.png", {m: row_name(m, cfg.grpo.init_from) for m in METHODS})
    print(md)
    with stage_run(cfg.mlflow, "report", "all", declared(cfg, PARAMS), run_name="results") as run:
        run.set_description(description(title, metrics, headline, rows, intervals))
        run.log_metrics({f"results/{r.model}/{k}": metrics[r.model][k] for r in rows for k in headline
                         if k in metrics[r.model]})
        for name in FILES:
            run.log_artifact(OUT / name)
        if run.active:
            install_views(run.client, run.experiment_id, headline)
            print(f"MLflow (after `mlflow server --backend-store-uri sqlite:///mlflow.db`, at the repository root):\n"
                  f"  results run:              {run_url(UI, run.experiment_id, run.run_id)}\n"
                  f"  base / SFT / SOAR / GRPO: {view_url(UI, run.experiment_id, RESULTS_VIEW)}\n"
                  f"  training curves:          {view_url(UI, run.experiment_id, TRAINING_VIEW, charts=True)}",
                  flush=True)


if __name__ == "__main__":
    run_main("report", main)
