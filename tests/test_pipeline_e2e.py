"""End to end: `dvc repro` on a micro profile in a copy of the repo, then the report and MLflow runs.

Also checks DVC's change tracking: a second `dvc repro` runs nothing, and
`dvc exp run -S soar.lambda_aux=0.5` reruns train@soar and what depends on it, not SFT or base; and
the multi-seed study (`dvc repro study/dvc.yaml`) on micro settings.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from repo_copy import commit_all, copy_checkout, ran_stages, run
from ruamel.yaml import YAML

from pipeline.config import read_params

pytestmark = pytest.mark.slow  # `dvc repro` in subprocesses: minutes

ROOT = Path(__file__).resolve().parents[1]
MICRO = {  # seconds-scale sizes; everything else stays the default tiny profile
    "synth": {"num_images": 160, "num_eval_geneval": 12, "num_eval_ocr": 4, "num_heldout": 6},
    "pretrain": {"max_train_steps": 4, "train_batch_size": 8, "log_every": 2, "lr_warmup_steps": 1},
    "train": {"max_train_steps": 2, "train_batch_size": 4, "log_every": 1, "snapshot_steps": 1},
    "sample": {"num_inference_steps": 3, "grid_prompts": 2},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    dest = copy_checkout(tmp_path_factory.mktemp("e2e") / "repo")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in MICRO.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = commit_all(dest, "micro")
    return dest, env


@pytest.fixture(scope="module")
def first_repro(repo) -> str:
    dest, env = repo
    return run([sys.executable, "-m", "dvc", "repro"], dest, env)


def test_repro_writes_the_report(repo, first_repro):
    dest, _ = repo
    assert {"synth", "prepare", "pretrain", "train@sft", "train@soar", "dynamics@sft", "dynamics@soar",
            "report"} <= ran_stages(first_repro)
    md = (dest / "data/report/results.md").read_text()
    for row in ("| base |", "| +SFT |", "| +SOAR |"):
        assert row in md
    rows = list(csv.DictReader((dest / "data/report/results.csv").open()))
    assert [r["model"] for r in rows] == ["base", "+SFT", "+SOAR"]
    for r in rows:
        for key in ("geneval", "ocr", "geneval/position"):
            assert 0.0 <= float(r[key]) <= 1.0
    grid = Image.open(dest / "data/report/grid.png")
    assert grid.width > 3 * 64 and grid.height > 4 * 64  # three model columns, 2 prompts x 2 sets
    assert (dest / "data/samples/soar/geneval/00000/samples/0000.png").is_file()
    assert (dest / "data/samples/soar/geneval/00000/metadata.jsonl").is_file()
    assert (dest / "dvc.lock").is_file()


def test_repro_writes_the_training_dynamics(repo, first_repro):
    dest, _ = repo
    final = json.loads((dest / "data/scores/soar/metrics.json").read_text())
    for method in ("sft", "soar"):
        rows = list(csv.DictReader((dest / f"data/dynamics/{method}.csv").open()))
        assert [int(r["step"]) for r in rows] == [0, 1, 2]  # base, then the snapshots of steps 1 and 2
    # the step-2 snapshot is the final SOAR model (no EMA in the tiny profile): same images, same scores
    assert {k: float(v) for k, v in rows[-1].items() if k != "step" and v != ""} == final
    snapshot, sampled = dest / "data/dynamics/soar/step-000002", dest / "data/samples/soar"
    pngs = sorted(p.relative_to(sampled) for p in sampled.rglob("*.png"))
    assert pngs and pngs == sorted(p.relative_to(snapshot) for p in snapshot.rglob("*.png"))
    assert all((snapshot / p).read_bytes() == (sampled / p).read_bytes() for p in pngs)
    plot = Image.open(dest / "data/report/dynamics.png")
    assert plot.width >= 800 and plot.height >= 300


def test_mlflow_has_one_run_per_stage(repo, first_repro):
    import mlflow

    dest, env = repo
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("soar")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by = {(r.data.tags["stage"], r.data.tags["method"]): r for r in runs}
    expected = {("synth", "world"), ("prepare", "filter"), ("pretrain", "base"), ("train", "sft"), ("train", "soar"),
                ("sample", "base"), ("sample", "sft"), ("sample", "soar"), ("score", "base"), ("score", "sft"),
                ("score", "soar"), ("dynamics", "sft"), ("dynamics", "soar"), ("report", "all")}
    assert expected <= set(by)
    soar_run = by[("train", "soar")]
    for key in ("loss", "loss_main", "loss_aux", "lr", "grad_norm", "images_per_s", "drift", "frac_t0"):
        assert key in soar_run.data.metrics, key
    assert "loss_aux" not in by[("train", "sft")].data.metrics
    assert soar_run.data.params["soar.lambda_aux"] == "1.0"
    assert len(soar_run.data.tags["git_commit"]) == 40
    assert "geneval" in by[("score", "soar")].data.metrics


def test_second_repro_does_nothing_and_exp_reruns_only_soar(repo, first_repro):
    dest, env = repo
    again = run([sys.executable, "-m", "dvc", "repro"], dest, env)
    assert ran_stages(again) == set(), again
    exp = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "soar.lambda_aux=0.5"], dest, env)
    assert ran_stages(exp) == {"train@soar", "sample@soar", "score@soar", "dynamics@soar", "report"}, exp


STUDY_MICRO = {"seeds": [0, 1], "lambda_aux": [1.0], "trajectory_length": [1], "sampling_steps": [2, 3],
               "heldout_images": 4, "drift_starts": [0, 1], "drift_max_k": 2}


def test_study_runs_seeds_and_sweep_and_groups_them_in_mlflow(repo, first_repro):
    """`dvc repro study/dvc.yaml` on the micro world: every run, the report, and MLflow's grouping."""
    import mlflow

    dest, env = repo
    params = read_params(dest / "params.yaml")  # YAML 1.2 as DVC writes it (`no` is a string)
    params["study"].update(STUDY_MICRO)
    with (dest / "params.yaml").open("w") as f:
        YAML(typ="safe", pure=True).dump(params, f)
    out = run([sys.executable, "-m", "dvc", "repro", "study/dvc.yaml"], dest, env)
    names = ["base", "sft-s0", "soar-s0", "sft-s1", "soar-s1", "sweep-l1.0-T1"]
    runs = {n: json.loads((dest / f"data/study/runs/{n}/metrics.json").read_text())["metrics"] for n in names}
    assert not any((dest / f"data/study/runs/{n}/model").exists() for n in names)  # only metrics are kept
    for m in runs.values():
        assert {"geneval", "ocr", "drift/mean/k1", "drift/mean/k2"} <= set(m) and m["drift/mean/k2"] > 0
    assert "steps2/geneval" not in runs["sweep-l1.0-T1"] and "steps2/geneval" in runs["soar-s1"]
    report = json.loads((dest / "data/report/study.json").read_text())
    row = {r["metric"]: r for r in report["comparison"]}["drift/mean/k1"]
    sft = [runs["sft-s0"]["drift/mean/k1"], runs["sft-s1"]["drift/mean/k1"]]
    soar = [runs["soar-s0"]["drift/mean/k1"], runs["soar-s1"]["drift/mean/k1"]]
    assert row["diff"] == pytest.approx(sum(soar) / 2 - sum(sft) / 2, abs=1e-12) and row["n_soar"] == 2
    assert row["low"] <= row["diff"] <= row["high"]
    md = (dest / "data/report/study.md").read_text()
    assert "| drift/mean/k1 |" in md and "| geneval |" in md and "lambda_aux \\ trajectory_length" in md
    assert Image.open(dest / "data/report/drift.png").width > 300
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("soar-study")
    all_runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = {r.data.tags["group"]: r for r in all_runs if r.data.tags.get("group_parent") == "true"}
    assert set(parents) == {"base", "sft", "soar", "sweep lambda_aux=1.0 trajectory_length=1"}
    children = [r for r in all_runs if r.data.tags.get("study_run") in ("sft-s0", "sft-s1")]
    assert len(children) == 2 and {r.data.tags["mlflow.parentRunId"] for r in children} == {
        parents["sft"].info.run_id}
    assert "loss" in children[0].data.metrics and "geneval" in children[0].data.metrics
    sft_geneval = [runs["sft-s0"]["geneval"], runs["sft-s1"]["geneval"]]
    assert parents["sft"].data.metrics["mean/geneval"] == pytest.approx(sum(sft_geneval) / 2)
    again = run([sys.executable, "-m", "dvc", "repro", "study/dvc.yaml"], dest, env)
    assert ran_stages(again) == set(), again
    assert {"study/dvc.yaml:seed@sft-0", "study/dvc.yaml:sweep@1.0-1", "study/dvc.yaml:report"} <= ran_stages(out)
