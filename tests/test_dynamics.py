"""Training dynamics end to end on a tiny model (CPU, seconds): snapshots -> dynamics stage -> curve CSV,
MLflow step metrics and the report's figure.

The stage's rows are checked against values computed here without the stage's code: each snapshot's
images sampled with ``soar.euler.sample`` and scored with the scorers directly, and step 0 against
the base model's score-stage metrics.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image
from test_checkpoint import run_train

import stages.common
import stages.dynamics
import stages.sample
import stages.score
from pipeline.config import parse_config, read_params
from pipeline.curves import plot_curves, read_curve, save_curves_png
from pipeline.evaluation import build_scorers
from soar.data.prompts import read_prompt_set
from soar.euler import image_seed, sample
from soar.models.bundle import load_bundle
from soar.rewards import Scorer, ScoreRecord, register
from soar.snapshots import list_snapshots

ROOT = Path(__file__).resolve().parents[1]
GENEVAL = [{"tag": tag, "include": [{"class": shape, "count": 1, "color": color}],
            "prompt": f"a photo of a {color} {shape}"}
           for tag, shape, color in [("single_object", "circle", "red"), ("color_attr", "square", "blue"),
                                     ("single_object", "triangle", "green"), ("color_attr", "circle", "blue")]]
OCR = ['a sign that says "CAT"', 'a sign that says "DOG"']
SAMPLE = dict(num_inference_steps=2, guidance_scale=4.5, resolution=16, batch_size=8, seed=7, grid_prompts=1)
BRIGHTNESS = "test_brightness"  # the tiny random model fails every GenEval / OCR prompt: this one sees every pixel
SCORERS = {"geneval": ["geneval", BRIGHTNESS], "ocr": ["ocr", BRIGHTNESS]}


class Brightness(Scorer):
    """Mean pixel value in [0, 1]: changes with the weights, unlike the tiny model's GenEval / OCR zeros."""

    name = BRIGHTNESS

    def score(self, images, prompts, metadata):
        return [ScoreRecord(float(im.mean()) / 255.0) for im in images]


register(BRIGHTNESS)(lambda **options: Brightness())


def write_params(work: Path, max_prompts: int | None) -> str:
    params = read_params(ROOT / "params.yaml")
    params["model"].update(base_path="model", models_dir="models")
    params["sample"].update(out_dir="samples", **SAMPLE, prompt_sets={
        "geneval": {"path": "geneval.jsonl", "format": "geneval", "images_per_prompt": 1},
        "ocr": {"path": "ocr.txt", "format": "text", "images_per_prompt": 1}})
    params["score"].update(out_dir="scores", scorers=SCORERS, ocr_upscale=128, device="cpu")
    params["dynamics"].update(out_dir="dynamics", max_prompts_per_set=max_prompts)
    params["mlflow"].update(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment="dynamics-test",
                            log_images=False)
    parse_config(params)
    name = f"params_{max_prompts}.yaml"
    (work / name).write_text(yaml.safe_dump(params, sort_keys=False))
    return name


def run_stage(work: Path, params: str, fn, *args) -> None:
    """A stage's ``main`` in this process, from ``work``, with ``params`` as its params file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("DVC_ROOT", str(work))
        mp.setattr(stages.common, "PARAMS_FILE", params)
        fn(*args)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Base model (sampled and scored), two SOAR snapshots (steps 1, 2), two prompt sets, and the stage run."""
    from helpers import write_tiny_training_world

    work = tmp_path_factory.mktemp("dynamics")
    model, images, _ = write_tiny_training_world(work)
    run_train(model, images, work / "models" / "soar", learning_rate=1e-2, lr_scheduler="constant", lr_warmup_steps=0,
              gradient_accumulation_steps=1, max_train_steps=2, checkpointing_steps=0, resume_from_checkpoint=None,
              ema_decay=None, snapshot_steps=1)  # large steps: each snapshot samples visibly other images
    (work / "geneval.jsonl").write_text("".join(json.dumps(g) + "\n" for g in GENEVAL))
    (work / "ocr.txt").write_text("\n".join(OCR))
    params = write_params(work, None)
    run_stage(work, params, stages.sample.main, "base")
    run_stage(work, params, stages.score.main, "base")
    run_stage(work, params, stages.sample.main, "soar")  # the final model: step 2's weights, sampled by sample@soar
    (work / "dynamics" / "soar" / "step-000099").mkdir(parents=True)  # an older run's step: removed
    handler, logger = Recorder(), logging.getLogger("pipeline.sample_sets")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run_stage(work, params, stages.dynamics.main, "soar")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    (work / "dynamics_log.txt").write_text("\n".join(handler.messages))
    return work


class Recorder(logging.Handler):
    """Keeps the messages of the records it sees (``logging`` at any level the logger passes)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def direct_metrics(model_dir: Path, transformer: Path | None, prompt_indices: dict[str, list[int]]) -> dict:
    """Sample the given prompts of each set with ``transformer`` and score them, outside the stages' code."""
    cfg = parse_config(yaml.safe_load((model_dir.parent / "params_None.yaml").read_text()))
    bundle = load_bundle(model_dir, transformer_path=transformer, t5_max_length=cfg.sample.t5_max_length)
    scorers = build_scorers(cfg.score, ["geneval", "ocr"])
    metrics = {}
    for set_name, path, fmt in (("geneval", "geneval.jsonl", "geneval"), ("ocr", "ocr.txt", "text")):
        items = [read_prompt_set(model_dir.parent / path, fmt)[i] for i in prompt_indices[set_name]]
        images = sample(bundle, [it.prompt for it in items], [image_seed(SAMPLE["seed"], it.index, 0) for it in items],
                        steps=SAMPLE["num_inference_steps"], guidance_scale=SAMPLE["guidance_scale"],
                        resolution=SAMPLE["resolution"])
        records = scorers[set_name].score(images, [it.prompt for it in items], [it.metadata for it in items])
        metrics.update(scorers[set_name].aggregate(records))
        metrics[f"{set_name}/{BRIGHTNESS}"] = float(np.mean([im.mean() / 255.0 for im in images]))  # used on 2 sets
    return metrics


def test_curve_rows_equal_direct_scores_of_each_snapshot(work):
    rows = read_curve(work / "dynamics" / "soar.csv")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0] == {"step": 0, **json.loads((work / "scores" / "base" / "all_metrics.json").read_text())}
    everything = {"geneval": list(range(len(GENEVAL))), "ocr": list(range(len(OCR)))}
    for step, transformer in list_snapshots(work / "models" / "soar"):
        assert rows[step] == {"step": step, **direct_metrics(work / "model", transformer, everything)}, step
    assert {"geneval", "geneval/single_object", "geneval/color_attr", "ocr", "ocr/test_brightness"} <= rows[0].keys()
    assert len({r["geneval/test_brightness"] for r in rows}) == 3  # every step sampled other images
    # step 2 is the final model: its images are sample@soar's, copied (the same bytes), step 1's are sampled
    copied = [m for m in (work / "dynamics_log.txt").read_text().splitlines() if "copied from" in m]
    assert sorted(m.split()[1] for m in copied) == ["soar@2:", "soar@2:"], copied  # both sets of step 2 only
    for path in (work / "samples" / "soar" / "geneval").rglob("*.png"):
        rel = path.relative_to(work / "samples" / "soar")
        assert (work / "dynamics" / "soar" / "step-000002" / rel).read_bytes() == path.read_bytes()
    assert not (work / "dynamics" / "soar" / "step-000099").exists()
    assert (work / "dynamics" / "soar" / "step-000002" / "geneval" / "00003" / "samples" / "0000.png").is_file()
    header = (work / "dynamics" / "soar.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["step", "geneval"]


def test_mlflow_run_has_the_curve_as_step_metrics(work):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dynamics-test")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'dynamics'")
    assert run.info.run_name == "dynamics:soar" and run.data.tags["method"] == "soar"
    rows = read_curve(work / "dynamics" / "soar.csv")
    for metric in ("geneval", "ocr", "geneval/color_attr", "ocr/test_brightness"):
        history = client.get_metric_history(run.info.run_id, f"dynamics/{metric}")
        assert sorted((m.step, m.value) for m in history) == [(r["step"], r[metric]) for r in rows], metric


def test_subset_of_prompts_and_its_base_point(work):
    params = write_params(work, 2)  # geneval: prompts 0 and 2 of 4; ocr: both
    run_stage(work, params, stages.dynamics.main, "soar")
    rows = read_curve(work / "dynamics" / "soar.csv")
    chosen = {"geneval": [0, 2], "ocr": [0, 1]}
    step_dir = work / "dynamics" / "soar" / "step-000001" / "geneval"
    assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == ["00000", "00002"]
    assert rows[0] == {"step": 0, **direct_metrics(work / "model", None, chosen)}
    assert rows[1] == {"step": 1, **direct_metrics(work / "model", list_snapshots(work / "models" / "soar")[0][1],
                                                   chosen)}


def test_no_snapshots_gives_the_base_point_only(work, capsys):
    run_stage(work, "params_None.yaml", stages.dynamics.main, "sft")  # no models/sft at all
    assert "no snapshots" in capsys.readouterr().out
    rows = read_curve(work / "dynamics" / "sft.csv")
    assert rows == [{"step": 0, **json.loads((work / "scores" / "base" / "all_metrics.json").read_text())}]


def test_a_gap_in_the_snapshots_stops_the_stage(work):
    """Snapshots of steps 4, 8 and 16: step 12 is lost, so the curve would have a gap; nothing is sampled."""
    from soar.snapshots import missing_steps

    assert missing_steps([4, 8, 16]) == [12] and missing_steps([5]) == missing_steps([]) == []
    src = work / "models" / "soar" / "snapshots" / "step-000001"
    for step in (4, 8, 16):
        shutil.copytree(src, work / "models" / "sft" / "snapshots" / f"step-{step:06d}")
    try:
        with pytest.raises(ValueError, match=r"models/sft/snapshots: the snapshots of steps \[12\] are missing"):
            run_stage(work, "params_None.yaml", stages.dynamics.main, "sft")
        assert not (work / "dynamics" / "sft" / "step-000004").exists()
    finally:
        shutil.rmtree(work / "models" / "sft")


def test_report_figure_has_one_panel_per_metric(work, tmp_path):
    soar = read_curve(work / "dynamics" / "soar.csv")
    sft = [{k: (v if k == "step" else v / 2) for k, v in r.items()} for r in soar]
    metrics = [k for k in soar[0] if k != "step"]
    fig = plot_curves({"sft": sft, "soar": soar})
    assert sorted(ax.get_title() for ax in fig.axes) == sorted({"geneval": "GenEval", "ocr": "OCR"}.get(m, m)
                                                               for m in metrics)
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)  # SFT and SOAR
    path = tmp_path / "dynamics.png"
    save_curves_png({"sft": sft, "soar": soar}, path)
    image = np.asarray(Image.open(path).convert("L"))
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    assert image.shape == (300 * rows, 400 * cols)
    assert (image < 128).mean() > 0.005  # lines, axes and text drawn, not a blank canvas
