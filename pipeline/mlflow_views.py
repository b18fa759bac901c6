"""Saved views of the MLflow UI: the comparison a reader opens first, one link away.

MLflow 3's UI keeps named views of an experiment's runs page (filter, columns, grouping, charts) as experiment
tags ``mlflow.sharedViewState.<key>``, listed under "Views" and opened by ``?viewStateShareKey=<key>``. The
report stage writes two:

- ``results`` ("base / SFT / SOAR / GRPO"): the score runs, one row per model with its metrics, grouped by
  ``run_group`` (one group per ``dvc repro`` / ``dvc exp run``);
- ``training`` ("training curves"): charts of loss, loss_aux and drift per step (GRPO's reward_mean, kl and
  clipfrac after them), then reward vs step
  (``dynamics/<metric>``), then the final scores.

The URL also carries ``workflowType=machine_learning``: MLflow 3 opens an experiment on its GenAI (traces)
view unless told otherwise. The state layout is the one MLflow 3's UI saves (checked against it by
tests/test_mlflow_views.py with a real server and headless Chromium, and by tools/screenshots.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

TAG_PREFIX = "mlflow.sharedViewState."  # MLflow UI: experiment tag of a saved view
RESULTS_VIEW = "results"  # key of the base / SFT / SOAR / GRPO table
TRAINING_VIEW = "training"  # key of the training-curves charts
TRAINING_METRICS = ("loss", "loss_aux", "drift", "loss_main", "aux_per_sample", "frac_t0", "grad_norm", "lr",
                    "images_per_s",  # charted in this order; names as soar.step logs them,
                    "reward_mean", "kl", "clipfrac")  # then as the GRPO loop logs them
CURVE_PREFIX = "dynamics/"  # reward-vs-step metrics of the dynamics runs


def column(kind: str, key: str) -> str:
    """A runs-table column id as the UI writes it (``metrics.`geneval```)."""
    return f"{kind}.`{key}`"


def base_state(search_filter: str) -> dict:
    """The fields every saved view holds (MLflow 3 UI's defaults), with ``search_filter``."""
    return {"searchFilter": search_filter, "orderByKey": "attributes.start_time", "orderByAsc": False,
            "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": [], "columnOrder": [], "columnWidths": {}, "runsHiddenMode": "SHOW_ALL",
            "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
            "useGroupedValuesInCharts": False, "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {},
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}


def results_state(metrics: Sequence[str]) -> dict:
    """Score runs with the columns ``model``, ``run_group`` and ``metrics``, grouped by ``run_group``."""
    state = base_state('tags.stage = "score"')
    state.update(orderByKey="tags.`mlflow.runName`", orderByAsc=True)  # by run name: score:base, :grpo, :sft, :soar
    state["selectedColumns"] = [column("tags", "method"), *(column("metrics", m) for m in metrics)]
    state["groupBy"] = {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "run_group"}]}
    return state


def chart(uuid: str, section: str, metric: str, kind: str) -> dict:
    """One chart card: a LINE (metric vs step) or BAR (last value per run) chart of ``metric``."""
    card = {"uuid": uuid, "type": kind, "runsCountToCompare": 10, "metricSectionId": section, "deleted": False,
            "isGenerated": False, "displayName": metric, "metricKey": metric}
    if kind == "LINE":
        card.update(lineSmoothness=0, xAxisScaleType="linear", scaleType="linear", range={}, xAxisKey="step",
                    selectedXAxisMetricKey="", yAxisKey="metric", yAxisExpressions=[], ignoreOutliers=False,
                    useGlobalXaxisKey=True, useGlobalLineSmoothing=True)
    return card


def training_state(metrics: Sequence[str]) -> dict:
    """Charts in three sections, in this order: training curves, reward vs step of ``metrics``, final scores.
    Pretraining is filtered out (its thousands of steps would squeeze the post-training curves to one edge)."""
    state = base_state('tags.stage != "pretrain"')
    sections = [("training", "Training", [(m, "LINE") for m in TRAINING_METRICS]),
                ("curves", "Reward vs step", [(CURVE_PREFIX + m, "LINE") for m in metrics]),
                ("scores", "Scores (final models)", [(m, "BAR") for m in metrics])]
    state["compareRunSections"] = [{"uuid": uid, "name": name, "display": True, "isReordered": True,
                                    "deleted": False, "isGenerated": False} for uid, name, _ in sections]
    state["compareRunCharts"] = [chart(f"{uid}-{i}", uid, key, kind) for uid, _, cards in sections
                                 for i, (key, kind) in enumerate(cards)]
    state["isAccordionReordered"] = True
    return state


def envelope(name: str, state: dict, now_ms: int) -> str:
    """The tag value: the view's name, times and state, as MLflow 3's UI saves it."""
    return json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})


def install_views(client, experiment_id: str, metrics: Sequence[str]) -> None:
    """Write (or refresh) the ``results`` and ``training`` views of ``experiment_id`` for score ``metrics``."""
    now = int(time.time() * 1000)
    client.set_experiment_tag(experiment_id, TAG_PREFIX + RESULTS_VIEW,
                              envelope("base / SFT / SOAR / GRPO", results_state(metrics), now))
    client.set_experiment_tag(experiment_id, TAG_PREFIX + TRAINING_VIEW,
                              envelope("training curves", training_state(metrics), now))


def view_url(ui: str, experiment_id: str, key: str, charts: bool = False) -> str:
    """The link opening view ``key`` of ``experiment_id`` on the MLflow UI at ``ui`` (e.g. http://127.0.0.1:5000)."""
    mode = "&compareRunsMode=CHART" if charts else ""
    return (f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={key}{mode}")


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """The link opening run ``run_id``'s Overview."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
