"""The saved MLflow views: what the README's link opens (the state MLflow 3's UI reads is checked in a browser by
tools/screenshots.py, which the end-to-end test runs where Chromium is installed)."""

from __future__ import annotations

import json

import pipeline.mlflow_views as views
from pipeline.mlflow_views import RESULTS_VIEW, TRAINING_METRICS, TRAINING_VIEW, results_state, training_state


def test_results_view_shows_score_runs_with_their_metrics_grouped_by_run_group():
    state = results_state(["geneval", "ocr", "pickscore"])
    assert state["searchFilter"] == 'tags.stage = "score"'
    assert state["selectedColumns"] == ["tags.`method`", "metrics.`geneval`", "metrics.`ocr`", "metrics.`pickscore`"]
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "run_group"}]
    assert state["orderByKey"] == "tags.`mlflow.runName`" and state["orderByAsc"] is True  # base, sft, soar


def test_training_view_charts_training_curves_then_reward_vs_step_then_scores():
    state = training_state(["geneval", "ocr"])
    assert state["searchFilter"] == 'tags.stage != "pretrain"'
    assert [s["name"] for s in state["compareRunSections"]] == ["Training", "Reward vs step", "Scores (final models)"]
    ids = [s["uuid"] for s in state["compareRunSections"]]
    order = sorted(state["compareRunCharts"], key=lambda c: ids.index(c["metricSectionId"]))
    assert order == state["compareRunCharts"]  # the cards are listed section by section
    keys = [c["metricKey"] for c in state["compareRunCharts"]]
    assert keys[:3] == ["loss", "loss_aux", "drift"] and keys[:len(TRAINING_METRICS)] == list(TRAINING_METRICS)
    assert keys[len(TRAINING_METRICS):] == ["dynamics/geneval", "dynamics/ocr", "geneval", "ocr"]
    kinds = {c["metricKey"]: c["type"] for c in state["compareRunCharts"]}
    assert kinds["loss"] == kinds["dynamics/ocr"] == "LINE" and kinds["geneval"] == "BAR"
    assert len({c["uuid"] for c in state["compareRunCharts"]}) == len(keys)


def test_views_are_experiment_tags_in_the_ui_envelope():
    written = {}

    class Client:
        def set_experiment_tag(self, experiment_id, key, value):
            written[(experiment_id, key)] = json.loads(value)

    views.install_views(Client(), "7", ["geneval"])
    results = written[("7", views.TAG_PREFIX + RESULTS_VIEW)]
    assert results["name"] == "base / SFT / SOAR / GRPO" and results["createdAt"] == results["updatedAt"] > 0
    assert json.loads(results["state"]) == results_state(["geneval"])
    assert json.loads(written[("7", views.TAG_PREFIX + TRAINING_VIEW)]["state"]) == training_state(["geneval"])
    assert json.loads(views.envelope("n", {"a": 1}, 5)) == {"name": "n", "createdAt": 5, "updatedAt": 5,
                                                           "state": '{"a": 1}'}


def test_links_open_the_model_training_view():
    assert views.view_url("http://h:5000/", "3", RESULTS_VIEW) == (
        "http://h:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=results")
    assert views.view_url("http://h:5000", "3", TRAINING_VIEW, charts=True).endswith(
        "viewStateShareKey=training&compareRunsMode=CHART")
    assert views.run_url("http://h:5000", "3", "abc") == "http://h:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
