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

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            self._mlflow.log_text(text, name)


@contextlib.contextmanager
def stage_run(mlflow_cfg, stage: str, method: str, params: Mapping[str, Any],
              main_process: bool = True) -> Iterator[StageRun]:
    """Open the run for one stage execution; yields a no-op handle on non-main processes."""
    if not main_process:
        yield StageRun(None, active=False)
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(mlflow_cfg.tracking_uri))
    if mlflow.get_experiment_by_name(mlflow_cfg.experiment) is None:
        artifacts = (repo_root() / "mlruns").as_uri() if "sqlite" in tracking_uri(mlflow_cfg.tracking_uri) else None
        mlflow.create_experiment(mlflow_cfg.experiment, artifact_location=artifacts)
    mlflow.set_experiment(mlflow_cfg.experiment)
    tags = {"method": method, "stage": stage, "git_commit": git_commit(),
            "dvc_exp": os.environ.get("DVC_EXP_NAME", ""), "dvc_stage": os.environ.get("DVC_STAGE", "")}
    with mlflow.start_run(run_name=f"{stage}:{method}", tags=tags):
        flat = flatten("", params)
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        yield StageRun(mlflow, active=True)
