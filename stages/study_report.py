"""Stage `study/dvc.yaml:report`: the study's tables and drift figure (pipeline/study_report.py).

    python -m stages.study_report        # data/report/study.{md,json} and drift.png from every run's metrics

Writes data/report/study.md (SFT vs SOAR over seeds with Welch intervals, GRPO against the base and SOAR,
metrics vs sampling steps, the sweep), study.json (the same numbers and every run's metrics) and drift.png;
logs the seed means to each configuration's MLflow group run and the report to a ``study:report`` run.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.study_report import (
    drift_figure,
    grpo_table,
    headline_metrics,
    main_table,
    read_runs,
    steps_table,
    sweep_table,
)
from pipeline.study_variants import BASE, seed_variants, sweep_variants
from pipeline.tracking import group_run, stage_run, use_experiment
from stages.common import declared, load, run_main

PARAMS = ("train", "soar", "grpo", "sample", "study", "mlflow")
REPORT_DIR = Path("data/report")


def main() -> None:
    cfg = load(PARAMS)
    st = cfg.study
    seeds, sweep = seed_variants(cfg), sweep_variants(cfg)
    runs = read_runs(Path(st.out_dir) / "runs", [BASE, *(v.name for v in seeds + sweep)])
    base = runs[BASE]["metrics"]
    sft = [runs[v.name]["metrics"] for v in seeds if v.method == "sft"]
    soar = [runs[v.name]["metrics"] for v in seeds if v.method == "soar"]
    grpo = [runs[v.name]["metrics"] for v in seeds if v.method == "grpo"]
    metrics = headline_metrics(base, st.drift_max_k)
    table, rows = main_table(base, sft, soar, metrics, st.confidence)
    grpo_text, grpo_rows = grpo_table(base, soar, grpo, metrics, st.confidence)
    reward = " + ".join(f"{w:g} x {name}" for name, w in cfg.grpo.reward.items())
    scored = [m for m in metrics if not m.startswith("drift")]
    top = [m for m in scored if "/" not in m]
    cells = {(v.lambda_aux, v.trajectory_length): runs[v.name]["metrics"] for v in sweep}
    sweeps = "\n\n".join(sweep_table(cells, m) for m in [*top, f"drift/mean/k{st.drift_max_k}"])
    same = cells.get((float(cfg.soar.lambda_aux), cfg.soar.trajectory_length))
    if same is not None:  # the sweep cell of the default SOAR settings is soar-s{seeds[0]} trained again
        twin = f"soar-s{st.seeds[0]}"
        equal = all(runs[twin]["metrics"].get(k) == v for k, v in same.items())  # the cell's keys (no steps*)
        sweeps += (f"\n\nReproducibility: the sweep cell lambda_aux={cfg.soar.lambda_aux}, "
                   f"trajectory_length={cfg.soar.trajectory_length} retrains {twin}; its metrics are "
                   f"{'identical' if equal else 'DIFFERENT'} ({len(same)} values compared).")
    groups = {"SFT": sft, "SOAR": soar, "GRPO": grpo}
    text = (f"# Study: SFT vs SOAR vs GRPO over seeds {list(st.seeds)} (tiny-world metrics; see README)\n\n"
            f"SOAR: lambda_aux={cfg.soar.lambda_aux}, trajectory_length={cfg.soar.trajectory_length}; "
            f"{cfg.train.max_train_steps} steps each from the same base and data.\n\n{table}\n\n"
            f"## Flow-GRPO over the same seeds\n\nReward {reward} on {cfg.grpo.prompts}, "
            f"{cfg.grpo.max_train_steps} optimiser steps ({cfg.grpo.images_per_iteration} images per iteration) "
            f"from the same base.\n\n{grpo_text}\n\n"
            f"## Final metrics vs sampling steps (seed means)\n\n"
            f"{steps_table(base, groups, top, st.sampling_steps, cfg.sample.num_inference_steps)}\n\n"
            f"## Sweep (seed {st.seeds[0]})\n\n{sweeps}\n\n![drift](drift.png)\n")
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "study.md").write_text(text)
    (REPORT_DIR / "study.json").write_text(json.dumps({"comparison": rows, "grpo": grpo_rows, "runs": runs},
                                                      indent=2, sort_keys=True))
    drift_figure(REPORT_DIR / "drift.png", base, groups)
    print(text)
    mlflow = use_experiment(cfg.mlflow, st.experiment)
    for group, table_rows in (("sft", rows), ("soar", rows), ("grpo", grpo_rows)):  # seed means on each group run
        with mlflow.start_run(run_id=group_run(cfg.mlflow, st.experiment, group)):
            mlflow.log_metrics({f"mean/{r['metric']}": r[f"{group}_mean"] for r in table_rows})
    with stage_run(cfg.mlflow, "study", "report", declared(cfg, ("study",)), experiment=st.experiment) as run:
        run.log_metrics({f"soar_minus_sft/{r['metric']}": r["diff"] for r in rows})
        run.log_metrics({f"grpo_minus_base/{r['metric']}": r["grpo_minus_base"] for r in grpo_rows})
        for name in ("study.md", "study.json", "drift.png"):
            run.log_artifact(REPORT_DIR / name)



if __name__ == "__main__":
    run_main("study_report", main)
