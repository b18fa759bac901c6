"""Stage `report`: results.md / results.csv (the paper's table layout), grid.png and dynamics.png (reward vs step)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.curves import read_curve, save_curves_png
from pipeline.report import MODELS, comparison_grid, results_table
from pipeline.tracking import stage_run
from stages.common import declared, load, run_main

PARAMS = ("sample", "score", "dynamics", "mlflow")
DYNAMICS = ("sft", "soar")  # the training runs with reward-vs-step curves
OUT = Path("data/report")


def main() -> None:
    cfg = load(PARAMS)
    metrics = {}
    for m in MODELS:
        path = Path(cfg.score.out_dir) / m / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"metrics not found: {path} (run score@{m})")
        metrics[m] = json.loads(path.read_text())
    md, csv_text = results_table(metrics)
    OUT.mkdir(parents=True, exist_ok=True)
    tiny = cfg.score.geneval_backend == "tiny"  # the tiny world's exact detector: its metrics are the tiny world's
    (OUT / "results.md").write_text(f"# Results{' (tiny-world metrics; see README)' * tiny}\n\n" + md)
    (OUT / "results.csv").write_text(csv_text)
    grid = comparison_grid(Path(cfg.sample.out_dir), list(cfg.sample.prompt_sets), cfg.sample.grid_prompts)
    grid.save(OUT / "grid.png")
    curves = {m: read_curve(Path(cfg.dynamics.out_dir) / f"{m}.csv") for m in DYNAMICS}
    save_curves_png(curves, OUT / "dynamics.png")
    print(md)
    with stage_run(cfg.mlflow, "report", "all", declared(cfg, PARAMS)) as run:
        for m, values in metrics.items():
            run.log_metrics({f"{m}/{k}": v for k, v in values.items()})
        for name in ("results.md", "results.csv", "grid.png", "dynamics.png"):
            run.log_artifact(OUT / name)


if __name__ == "__main__":
    run_main("report", main)
