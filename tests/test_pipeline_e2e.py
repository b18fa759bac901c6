"""End to end: `dvc repro` on a micro profile in a copy of the repo, with one tiny reference model of each
family (SD-XL, SD3, FLUX pipelines), then the seven-row report (base and the SFT, SOAR and GRPO arms) and MLflow
runs.

Also checks DVC's change tracking: a second `dvc repro` runs nothing, and
`dvc exp run -S soar.lambda_aux=0.5` reruns train@soar and what depends on it, not SFT or base; the views a
reader opens (a real `mlflow server` over the moved repository, DVC's metrics / experiments / plots views);
the multi-seed study (`dvc repro study/dvc.yaml`) on micro settings; and "SOAR then GRPO"
(`grpo.init_from: soar`) reruns the GRPO arm alone, from SOAR's weights.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
import sys
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import free_port, start_mlflow_server
from PIL import Image
from reference_layouts import write_flux_folder, write_sdxl_folder
from repo_copy import commit_all, copy_checkout, ran_stages, run
from ruamel.yaml import YAML
from sd35_layout import write_sd35_folder

from pipeline.config import read_params

pytestmark = pytest.mark.slow  # `dvc repro` in subprocesses: minutes

ROOT = Path(__file__).resolve().parents[1]
MICRO = {  # seconds-scale sizes; everything else stays the default tiny profile
    "synth": {"num_images": 160, "num_eval_geneval": 12, "num_eval_ocr": 4, "num_heldout": 6},
    "pretrain": {"max_train_steps": 4, "train_batch_size": 8, "log_every": 2, "lr_warmup_steps": 1},
    "train": {"max_train_steps": 2, "train_batch_size": 4, "log_every": 1, "snapshot_steps": 1},
    "grpo": {"max_train_steps": 2, "prompts_per_iteration": 2, "num_image_per_prompt": 2, "updates_per_iteration": 1,
             "num_steps": 3, "sample_batch_size": 4, "train_batch_size": 4, "log_every": 1, "snapshot_steps": 1},
    "sample": {"num_inference_steps": 3, "grid_prompts": 2},
}
REFERENCES = {  # one tiny model per family, each in the real diffusers layout, at the micro sampling size
    "sdxl": {"family": "sdxl", "label": "SD-XL (1024²)", "negative_prompt": ""},
    "sd35l": {"family": "sd3", "label": "SD3.5-L (1024²)", "negative_prompt": "", "max_sequence_length": 16},
    "flux": {"family": "flux", "label": "FLUX.1-Dev", "negative_prompt": None, "max_sequence_length": 16},
}
WRITERS = {"sdxl": write_sdxl_folder, "sd3": write_sd35_folder, "flux": write_flux_folder}
TABLE = ["SD-XL (1024²)", "SD3.5-L (1024²)", "FLUX.1-Dev", "base", "+ SFT", "+ SOAR", "+ GRPO"]  # paper's order


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    dest = copy_checkout(tmp_path_factory.mktemp("e2e") / "repo")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in MICRO.items():
        params[section].update(values)
    params["references"] = {
        name: {"path": str(WRITERS[ref["family"]](dest.parent / "references" / name)), **ref, "resolution": 32,
               "num_inference_steps": 3, "guidance_scale": 3.5, "batch_size": 8}
        for name, ref in REFERENCES.items()}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = commit_all(dest, "micro")
    env.pop("MLFLOW_TRACKING_URI")  # the default store: mlflow.db and mlruns/ in the repository, as users have it
    return dest, env


def store(dest: Path) -> str:
    return f"sqlite:///{dest / 'mlflow.db'}"


@pytest.fixture(scope="module")
def first_repro(repo) -> str:
    dest, env = repo
    return run([sys.executable, "-m", "dvc", "repro"], dest, env)


@pytest.fixture(scope="module")
def exp_run(repo, first_repro) -> str:
    """`dvc exp run -S soar.lambda_aux=0.5` after the first repro (its output)."""
    dest, env = repo
    return run([sys.executable, "-m", "dvc", "exp", "run", "-S", "soar.lambda_aux=0.5"], dest, env)


def test_repro_writes_the_report(repo, first_repro):
    dest, _ = repo
    assert {"synth", "prepare", "pretrain", "train@sft", "train@soar", "train@grpo", "dynamics@sft", "dynamics@soar",
            "dynamics@grpo", "report"} <= ran_stages(first_repro)
    md = (dest / "data/report/results.md").read_text()
    assert {"sample_ref@sdxl", "sample_ref@sd35l", "sample_ref@flux", "score_ref@flux"} <= ran_stages(first_repro)
    assert md.splitlines()[2].startswith("| Model | #Iter | GenEval | OCR |")
    assert [line.split(" | ")[0].lstrip("| ") for line in md.splitlines()[4:11]] == TABLE
    assert [line.split(" | ")[1] for line in md.splitlines()[4:11]] == ["–", "–", "–", "–", "2", "2", "2"]
    assert set(json.loads((dest / "data/scores/soar/metrics.json").read_text())) == {"geneval", "ocr"}  # headline
    assert "geneval/position" in json.loads((dest / "data/scores/soar/all_metrics.json").read_text())
    rows = list(csv.DictReader((dest / "data/report/results.csv").open()))
    assert [r["model"] for r in rows] == TABLE and [r["iterations"] for r in rows] == ["–"] * 4 + ["2"] * 3
    for r in rows:
        for key in ("geneval", "ocr", "geneval/position"):
            assert 0.0 <= float(r[f"{key}_lo"]) <= float(r[key]) <= float(r[f"{key}_hi"]) <= 1.0  # 95 % interval
            assert float(r[f"{key}_hi"]) > float(r[f"{key}_lo"])  # a dozen images: never a point
    assert re.search(r"\| \d\.\d{4} \(\d\.\d{3}–\d\.\d{3}\) \|", md.splitlines()[4])  # cells show intervals
    grid = Image.open(dest / "data/report/grid.png")
    assert grid.width > 7 * 64 and grid.height > 4 * 64  # seven model columns, 2 prompts x 2 sets
    for name in REFERENCES:  # the same prompts and seeds, the layout and the guard of our own samples
        index = [json.loads(line) for line in (dest / f"data/samples/{name}/geneval/index.jsonl").open()]
        ours = [json.loads(line) for line in (dest / "data/samples/base/geneval/index.jsonl").open()]
        assert [(e["prompt"], e["seed"]) for e in index] == [(e["prompt"], e["seed"]) for e in ours]
        guard = json.loads((dest / f"data/samples/{name}/geneval/sampling.json").read_text())
        assert guard["family"] == REFERENCES[name]["family"] and guard["resolution"] == 32
        assert Image.open(dest / f"data/samples/{name}/geneval/00000/samples/0000.png").size == (32, 32)
    assert (dest / "data/samples/soar/geneval/00000/samples/0000.png").is_file()
    assert (dest / "data/samples/soar/geneval/00000/metadata.jsonl").is_file()
    assert (dest / "dvc.lock").is_file()


def test_reference_images_equal_their_pipelines(repo, first_repro):
    """What sample_ref@ wrote through DVC is what the family's pipeline makes of the same batch (the stage's
    first batch of the geneval set: its prompts and per-image seeds)."""
    import torch

    from pipeline.config import parse_config
    from pipeline.references import load_reference, sample_reference
    from pipeline.sample_layout import load_image

    dest, _ = repo
    cfg = parse_config(read_params(dest / "params.yaml"))
    for name, ref in cfg.references.items():
        set_dir = dest / f"data/samples/{name}/geneval"
        batch = [json.loads(line) for line in (set_dir / "index.jsonl").open()][:ref.batch_size]
        images = sample_reference(load_reference(ref, torch.device("cpu"), name), ref, [e["prompt"] for e in batch],
                                  [e["seed"] for e in batch])
        for e, image in zip(batch, images, strict=True):
            assert (load_image(set_dir / e["path"]) == image).all(), (name, e["path"])


def test_repro_writes_the_training_dynamics(repo, first_repro):
    dest, _ = repo
    final = json.loads((dest / "data/scores/soar/all_metrics.json").read_text())
    base = {k: float(v) for k, v in json.loads((dest / "data/scores/base/all_metrics.json").read_text()).items()}
    for method in ("grpo", "sft", "soar"):
        rows = list(csv.DictReader((dest / f"data/dynamics/{method}.csv").open()))
        assert [int(r["step"]) for r in rows] == [0, 1, 2]  # base, then the snapshots of steps 1 and 2
        assert {k: float(v) for k, v in rows[0].items() if k != "step" and v != ""} == base
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
    client = mlflow.MlflowClient(tracking_uri=store(dest))
    exp = client.get_experiment_by_name("soar")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by = {(r.data.tags["stage"], r.data.tags["method"]): r for r in runs}
    expected = {("synth", "world"), ("prepare", "filter"), ("pretrain", "base"), ("train", "sft"), ("train", "soar"),
                ("sample", "base"), ("sample", "sft"), ("sample", "soar"), ("score", "base"), ("score", "sft"),
                ("score", "soar"), ("dynamics", "sft"), ("dynamics", "soar"), ("report", "all"), ("embed", "text"),
                ("train", "grpo"), ("sample", "grpo"), ("score", "grpo"), ("dynamics", "grpo")}
    expected |= {(stage, name) for stage in ("sample", "score") for name in REFERENCES}
    assert expected <= set(by) and len(runs) == len(expected)  # one run each
    assert len({r.data.tags["run_group"] for r in runs}) == 1  # one `dvc repro`, one group
    assert by[("report", "all")].info.run_name == "results"
    assert "| + SOAR |" in by[("report", "all")].data.tags["mlflow.note.content"]
    assert set(by[("score", "soar")].data.metrics) == {"geneval", "ocr"}  # the headline numbers only
    assert not any(k.startswith("final/") for k in by[("train", "soar")].data.metrics)
    for r in runs:  # artifacts under the repository's mlruns/, by a relative path
        assert r.info.artifact_uri == f"mlruns/{r.info.run_id}/artifacts", r.info.artifact_uri
    samples = dest / by[("sample", "base")].info.artifact_uri / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["geneval.png", "ocr.png"]
    assert Image.open(samples / "geneval.png").width > 3 * 192  # a grid of captioned images
    soar_run = by[("train", "soar")]
    for key in ("loss", "loss_main", "loss_aux", "lr", "grad_norm", "images_per_s", "drift", "frac_t0"):
        assert key in soar_run.data.metrics, key
    assert "loss_aux" not in by[("train", "sft")].data.metrics
    assert {"reward_mean", "kl", "clipfrac", "grad_norm"} <= set(by[("train", "grpo")].data.metrics)
    assert by[("train", "grpo")].data.params["grpo.init_from"] == "base"
    assert soar_run.data.params["soar.lambda_aux"] == "1.0"
    assert len(soar_run.data.tags["git_commit"]) == 40
    assert "geneval" in by[("score", "soar")].data.metrics


def test_second_repro_does_nothing_and_exp_reruns_only_soar(repo, first_repro):
    dest, env = repo
    again = run([sys.executable, "-m", "dvc", "repro"], dest, env)
    assert ran_stages(again) == set(), again
    assert "Data and pipelines are up to date" in run([sys.executable, "-m", "dvc", "status", "dvc.yaml"], dest, env)


def test_exp_run_reruns_only_soar(exp_run):
    assert ran_stages(exp_run) == {"train@soar", "sample@soar", "score@soar", "dynamics@soar", "report"}, exp_run


# the README's recipe: the experiments, the params that differ and SOAR's scores; no dependency-hash columns
EXP_SHOW = ["dvc", "exp", "show", "--no-pager", "--only-changed", "--drop", r"(?!data/scores/soar/metrics\.json:).*/"]
TERMINAL = 160  # columns the DVC views must fit


def widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_dvc_views_fit_a_terminal_and_plots_render_offline(repo, exp_run):
    dest, env = repo
    env = dict(env, COLUMNS=str(TERMINAL))
    metrics = run([sys.executable, "-m", "dvc", "metrics", "show"], dest, env)
    assert widest(metrics) <= TERMINAL and "report.json" not in metrics, metrics  # models' scores only
    assert {"data/scores/base/metrics.json", "geneval", "ocr"} <= set(metrics.split()), metrics
    shown = run([sys.executable, "-m", *EXP_SHOW], dest, env)
    assert widest(shown) <= TERMINAL, shown
    name = exp_name(dest, env)
    assert name in shown and "soar.lambda_aux" in shown and "…" not in shown, shown
    assert "data/scores/soar/metrics.json:geneval" in shown and "sft/metrics.json" not in shown, shown
    plots = run([sys.executable, "-m", "dvc", "plots", "show"], dest, env)
    html = (dest / "dvc_plots" / "index.html").read_text()
    assert html.count("<img") == 2 and "dynamics.png" in html and "grid.png" in html, plots
    assert "dvc_plots" not in run(["git", "status", "--porcelain"], dest, env)  # ignored


def exp_name(dest: Path, env: dict) -> str:
    """The name of the experiment `dvc exp run` made (the only one)."""
    listed = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], dest, env))
    names = [e["name"] for rev in listed for e in rev.get("experiments") or [] if e.get("name")]
    assert len(names) == 1, listed
    return names[0]


def api(port: int, path: str, body: dict | None = None):
    """MLflow REST: GET ``path`` (or POST ``body``), the decoded JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        raw = answer.read()
    return raw if path.startswith("/get-artifact") else json.loads(raw)


def test_mlflow_server_over_the_moved_repository_shows_the_comparison(repo, exp_run, tmp_path_factory):
    """A real `mlflow server` started at the root of the moved repository: the saved views, the results runs of
    both run groups with their tables, the score runs grouped, and artifacts served from the new place."""
    dest, env = repo
    moved = tmp_path_factory.mktemp("moved") / "repo"
    shutil.move(dest, moved)  # nothing is left at the old place
    port = free_port()
    server = start_mlflow_server("sqlite:///mlflow.db", moved, port)
    try:
        exp = api(port, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=soar")["experiment"]
        tags = {t["key"]: t["value"] for t in exp["tags"]}
        results_view = json.loads(json.loads(tags["mlflow.sharedViewState.results"])["state"])
        assert results_view["searchFilter"] == 'tags.stage = "score"'
        assert {"metrics.`geneval`", "metrics.`ocr`"} <= set(results_view["selectedColumns"])
        assert "mlflow.sharedViewState.training" in tags

        def search(flt: str) -> list[dict]:
            found = api(port, "/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [exp["experiment_id"]], "filter": flt, "max_results": 100})
            return [{**r, "tags": {t["key"]: t["value"] for t in r["data"].get("tags", [])}}
                    for r in found.get("runs", [])]

        results = {r["tags"]["run_group"]: r for r in search("attributes.run_name = 'results'")}
        scores: dict[str, set[str]] = {}
        for r in search("tags.stage = 'score'"):
            scores.setdefault(r["tags"]["run_group"], set()).add(r["tags"]["method"])
        name = exp_name(moved, env)
        (first,) = set(results) - {name}
        assert first.startswith("repro-") and set(results) == set(scores) == {first, name}
        assert scores == {first: {"base", "sft", "soar", "grpo", *REFERENCES}, name: {"soar"}}  # the exp: SOAR only
        for group, r in results.items():
            assert "| + SOAR |" in r["tags"]["mlflow.note.content"] and group in r["tags"]["mlflow.note.content"]
        newest = results[name]["info"]["run_id"]
        served = api(port, f"/get-artifact?path=results.md&run_uuid={newest}")
        assert served == (moved / "data/report/results.md").read_bytes()
        if shutil.which("chromium") and importlib.util.find_spec("playwright"):
            shots = tmp_path_factory.mktemp("shots")
            out = run([sys.executable, str(ROOT / "tools" / "screenshots.py"), "--repo", str(moved), "--out",
                       str(shots)], moved, env)
            assert len(list(shots.glob("*.png"))) == 5, out
        else:
            warnings.warn("chromium or playwright missing: the browser check of the MLflow views did not run",
                          stacklevel=1)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.move(moved, dest)


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
    names = ["base", "sft-s0", "soar-s0", "grpo-s0", "sft-s1", "soar-s1", "grpo-s1", "sweep-l1.0-T1"]
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
    grpo = {r["metric"]: r for r in report["grpo"]}["geneval"]
    assert grpo["grpo_mean"] == pytest.approx((runs["grpo-s0"]["geneval"] + runs["grpo-s1"]["geneval"]) / 2)
    assert grpo["grpo_minus_base"] == pytest.approx(grpo["grpo_mean"] - runs["base"]["geneval"], abs=1e-12)
    assert "## Flow-GRPO over the same seeds" in md
    assert Image.open(dest / "data/report/drift.png").width > 300
    client = mlflow.MlflowClient(tracking_uri=store(dest))
    exp = client.get_experiment_by_name("soar-study")
    all_runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = {r.data.tags["group"]: r for r in all_runs if r.data.tags.get("group_parent") == "true"}
    assert set(parents) == {"base", "sft", "soar", "grpo", "sweep lambda_aux=1.0 trajectory_length=1"}
    children = [r for r in all_runs if r.data.tags.get("study_run") in ("sft-s0", "sft-s1")]
    assert len(children) == 2 and {r.data.tags["mlflow.parentRunId"] for r in children} == {
        parents["sft"].info.run_id}
    assert "loss" in children[0].data.metrics and "geneval" in children[0].data.metrics
    sft_geneval = [runs["sft-s0"]["geneval"], runs["sft-s1"]["geneval"]]
    assert parents["sft"].data.metrics["mean/geneval"] == pytest.approx(sum(sft_geneval) / 2)
    again = run([sys.executable, "-m", "dvc", "repro", "study/dvc.yaml"], dest, env)
    assert ran_stages(again) == set(), again
    status = run([sys.executable, "-m", "dvc", "status"], dest, env)  # every pipeline of the project
    assert status.strip() == "Data and pipelines are up to date.", status
    assert {"study/dvc.yaml:seed@sft-0", "study/dvc.yaml:seed@grpo-1", "study/dvc.yaml:sweep@1.0-1",
            "study/dvc.yaml:report"} <= ran_stages(out)


def test_soar_then_grpo_is_one_parameter(repo, exp_run):
    """`grpo.init_from: soar`: only the GRPO arm and the report rerun; the GRPO run records its start, its curve
    starts from SOAR's scores, and its row reads + SOAR + GRPO."""
    import mlflow

    dest, env = repo
    params = read_params(dest / "params.yaml")
    params["grpo"]["init_from"] = "soar"
    with (dest / "params.yaml").open("w") as f:
        YAML(typ="safe", pure=True).dump(params, f)
    out = run([sys.executable, "-m", "dvc", "repro"], dest, env)
    assert ran_stages(out) == {"train@grpo", "sample@grpo", "score@grpo", "dynamics@grpo", "report"}, out
    soar = {k: float(v) for k, v in json.loads((dest / "data/scores/soar/all_metrics.json").read_text()).items()}
    rows = list(csv.DictReader((dest / "data/dynamics/grpo.csv").open()))
    assert {k: float(v) for k, v in rows[0].items() if k != "step" and v != ""} == soar  # step 0: SOAR's model
    md = (dest / "data/report/results.md").read_text()
    labels = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines()[4:11]]
    assert labels[-4:] == ["base", "+ SFT", "+ SOAR", "+ SOAR + GRPO"]  # the references' order is the YAML's
    client = mlflow.MlflowClient(tracking_uri=store(dest))
    runs = client.search_runs([client.get_experiment_by_name("soar").experiment_id],
                              "tags.stage = 'train' and tags.method = 'grpo'", order_by=["attributes.start_time DESC"])
    assert runs[0].data.params["grpo.init_from"] == "soar"
