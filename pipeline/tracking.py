"""MLflow tracking: one run per stage execution, logged from the main process only.

Store: ``mlflow.tracking_uri`` from params, else ``$MLFLOW_TRACKING_URI``, else the sqlite file
``mlflow.db`` at the repository root (``$DVC_ROOT`` when DVC runs the stage, so queued and
temporary experiments log to the user's store). Experiment from params (``soar``). Tags:
``method``, ``stage``, ``git_commit``, ``dvc_exp`` (DVC's experiment name, when set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DB_NAME = "mlflow.db"


def repo_root() -> Path:
    """The DVC repository root: ``$DVC_ROOT`` when set, else this checkout."""
    return Path(os.environ.get("DVC_ROOT", REPO_ROOT))


def tracking_uri(configured: str | None) -> str:
    """Where runs go: params, then ``$MLFLOW_TRACKING_URI``, then sqlite at the repo root."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / DB_NAME}"


def git_commit(cwd: Path | None = None) -> str:
    """HEAD's commit hash, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or repo_root(), capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Flatten nested dataclasses / mappings into ``{"a.b.c": value}`` for ``log_params``."""
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


class StageRun:
    """Thin handle over an active MLflow run (a no-op when ``active`` is False)."""

    def __init__(self, mlflow_module, active: bool) -> None:
        self._mlflow, self.active = mlflow_module, active

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.active:
            clean = {k.replace("@", "_"): float(v) for k, v in metrics.items()}
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)


def use_experiment(mlflow_cfg, experiment: str | None = None):
    """Point mlflow at the configured store and experiment (``experiment`` overrides the config's); returns mlflow."""
    import mlflow

    name = experiment or mlflow_cfg.experiment
    mlflow.set_tracking_uri(tracking_uri(mlflow_cfg.tracking_uri))
    if mlflow.get_experiment_by_name(name) is None:
        artifacts = (repo_root() / "mlruns").as_uri() if "sqlite" in tracking_uri(mlflow_cfg.tracking_uri) else None
        mlflow.create_experiment(name, artifact_location=artifacts)
    mlflow.set_experiment(name)
    return mlflow


def group_run(mlflow_cfg, experiment: str, group: str, tags: Mapping[str, str] | None = None) -> str:
    """The id of the parent run named ``group`` in ``experiment`` (created once, found by its ``group`` tag).

    Runs started with ``parent_run_id`` = this id show as its children in the MLflow UI, so the seeds
    of one configuration sit together (and compare side by side).
    """
    mlflow = use_experiment(mlflow_cfg, experiment)
    found = mlflow.search_runs(filter_string=f"tags.group = '{group}' and tags.group_parent = 'true'",
                               max_results=1, output_format="list")
    if found:
        return found[0].info.run_id
    with mlflow.start_run(run_name=group, tags={"group": group, "group_parent": "true", **(tags or {})}) as run:
        return run.info.run_id


@contextlib.contextmanager
def stage_run(mlflow_cfg, stage: str, method: str, params: Mapping[str, Any], main_process: bool = True, *,
              experiment: str | None = None, run_name: str | None = None, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
    """Open the run for one stage execution; yields a no-op handle on non-main processes.

    ``experiment`` / ``run_name`` override the config's experiment and ``{stage}:{method}``;
    ``parent_run_id`` nests the run under a group run (``group_run``); ``tags`` are added to the standard ones.
    """
    if not main_process:
        yield StageRun(None, active=False)
        return
    mlflow = use_experiment(mlflow_cfg, experiment)
    all_tags = {"method": method, "stage": stage, "git_commit": git_commit(),
                "dvc_exp": os.environ.get("DVC_EXP_NAME", ""), "dvc_stage": os.environ.get("DVC_STAGE", ""),
                **(tags or {})}
    with mlflow.start_run(run_name=run_name or f"{stage}:{method}", tags=all_tags, parent_run_id=parent_run_id):
        flat = flatten("", params)
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        yield StageRun(mlflow, active=True)
