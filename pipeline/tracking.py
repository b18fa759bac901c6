"""MLflow tracking: one run per stage execution, logged from the main process only.

Store: ``mlflow.tracking_uri`` from params, else ``$MLFLOW_TRACKING_URI``, else the sqlite file
``mlflow.db`` at the repository root (``$DVC_ROOT`` when DVC runs the stage, so queued and
temporary experiments log to the user's store). Experiment from params (``soar``). Tags:
``method``, ``stage``, ``git_commit``, ``dvc_exp`` (DVC's experiment name, when set), ``run_group`` (which
``dvc repro`` / ``dvc exp run`` the run belongs to: ``run_group``), ``host`` and ``pid``.

Artifacts travel with the repository: a new experiment in the default sqlite store keeps its artifacts in
``mlruns/`` under a *relative* artifact root, so ``mlflow ui`` / ``mlflow server`` started at the repository
root serve them wherever the repository was moved or copied to (MLflow itself stores absolute paths).

Robustness: a new sqlite store is created under a file lock (stages starting together would otherwise
race on its tables); an http(s) tracking server is probed with a short timeout before use, so an
unreachable one fails in seconds naming the URI instead of after MLflow's minutes of retries; a run
left RUNNING by a stage process that died on this host is marked FAILED when that stage runs again, and
a stage stopped by SIGTERM (``kill``, a scheduler's time limit) marks its own run FAILED on the way out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DB_NAME = "mlflow.db"
PROBE_TIMEOUT_S = 5.0  # how long an http(s) tracking server may take to answer /health before the stage stops
ARTIFACT_DIR = "mlruns"  # artifact root of experiments in the default store, relative to the repository root
PARAMS_FILE = "params.yaml"  # hashed into the run group of a plain `dvc repro`


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


def run_group() -> str:
    """The group of this stage's run: DVC's experiment name under ``dvc exp run``; otherwise ``repro-<digest>``
    (7 hex digits of the commit and params.yaml), so the stages of one configuration share a group and a new
    commit or params edit starts another."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    params = repo_root() / PARAMS_FILE
    data = params.read_bytes() if params.is_file() else b""
    return "repro-" + hashlib.sha256(git_commit().encode() + b"\0" + data).hexdigest()[:7]


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

    @property
    def run_id(self) -> str:
        return self._mlflow.active_run().info.run_id

    @property
    def experiment_id(self) -> str:
        return self._mlflow.active_run().info.experiment_id

    @property
    def client(self):
        """An ``MlflowClient`` of the run's store."""
        return self._mlflow.MlflowClient()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.active:
            clean = {k.replace("@", "_"): float(v) for k, v in metrics.items()}
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy file ``path`` into the run's artifacts (under folder ``artifact_path``)."""
        if not self.active:
            return
        local = local_artifact_dir(self._mlflow.get_artifact_uri())
        if local is None:  # not the relative root: MLflow's artifact repository writes or uploads it
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)
            return
        dest = local / (artifact_path or "")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / Path(path).name)

    def set_description(self, markdown: str) -> None:
        """The run's description (MLflow shows it on the run's Overview, rendered as markdown)."""
        if self.active:
            self._mlflow.set_tag("mlflow.note.content", markdown)


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts when its URI is relative (the default store's ``mlruns/<run>/artifacts``):
    under the repository root, where MLflow would resolve it against the working directory. None for every other
    URI (``file:``, absolute paths, remote stores), which MLflow's own artifact repositories handle."""
    if urllib.parse.urlparse(artifact_uri).scheme or Path(artifact_uri).is_absolute():
        return None
    return repo_root() / artifact_uri


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ``RuntimeError`` naming ``uri`` unless the MLflow server there answers ``/health`` within ``timeout``."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as answer:
            answer.read()
    except OSError as err:  # URLError and timeouts included
        reason = getattr(err, "reason", err)
        raise RuntimeError(f"MLflow tracking server {uri} does not answer ({reason}); start it, or set "
                           "mlflow.tracking_uri: null to log to the local sqlite store") from None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a sqlite store (``{db}.lock``) while it may be created; no-op otherwise."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def relative_artifact_root(db: Path, experiment_id: str) -> None:
    """Store ``ARTIFACT_DIR`` (relative) as the artifact root of experiment ``experiment_id`` in sqlite store
    ``db``: MLflow's API turns every artifact location into an absolute path, which breaks when the repository
    moves; its runs then get ``mlruns/<run>/artifacts``, read relative to the repository root."""
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                    (ARTIFACT_DIR, int(experiment_id)))


def use_experiment(mlflow_cfg, experiment: str | None = None):
    """Point mlflow at the configured store and experiment (``experiment`` overrides the config's); returns mlflow.

    A new experiment in a sqlite store at the repository root gets the relative artifact root ``mlruns``; in a
    sqlite store elsewhere, ``<repository>/mlruns`` (absolute); on a server, the server's artifact root.
    """
    import mlflow

    name = experiment or mlflow_cfg.experiment
    uri = tracking_uri(mlflow_cfg.tracking_uri)
    if uri.startswith(("http://", "https://")):
        probe_server(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):  # the first access creates the tables of a new sqlite store
        if mlflow.get_experiment_by_name(name) is None:
            sqlite = uri.startswith("sqlite:///")
            artifacts = (repo_root() / ARTIFACT_DIR).as_uri() if sqlite else None
            experiment_id = mlflow.create_experiment(name, artifact_location=artifacts)
            db = Path(uri.removeprefix("sqlite:///"))
            if sqlite and db.resolve().parent == repo_root().resolve():
                relative_artifact_root(db, experiment_id)
    mlflow.set_experiment(name)
    return mlflow


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def close_dead_runs(mlflow, run_name: str) -> list[str]:
    """Mark FAILED the RUNNING runs named ``run_name`` whose process (tags ``host``, ``pid``) is gone from this
    host; returns their ids. Runs of other hosts are left alone (their processes cannot be checked here)."""
    host = socket.gethostname()
    running = mlflow.search_runs(filter_string=f"attributes.run_name = '{run_name}' and attributes.status = 'RUNNING'",
                                 output_format="list")
    dead = [r.info.run_id for r in running if r.data.tags.get("host") == host
            and r.data.tags.get("pid", "").isdigit() and not process_alive(int(r.data.tags["pid"]))]
    for run_id in dead:
        mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
    return dead


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


def interrupted_run(mlflow_cfg, run_name: str, out_dir: str, experiment: str | None = None) -> str | None:
    """The id of the newest run named ``run_name`` that wrote to ``out_dir`` (tag ``out_dir``) and did not
    finish (RUNNING, FAILED or KILLED): the run a training resumed from a checkpoint continues."""
    mlflow = use_experiment(mlflow_cfg, experiment)
    found = mlflow.search_runs(filter_string=f"attributes.run_name = '{run_name}' and tags.out_dir = '{out_dir}' "
                                             "and attributes.status != 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return found[0].info.run_id if found else None


def raise_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While open, SIGTERM raises ``SystemExit(143)`` (Python's default is to die at once, leaving the MLflow run
    RUNNING); the previous handler comes back on exit. Only the main thread can set handlers: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stage_run(mlflow_cfg, stage: str, method: str, params: Mapping[str, Any], main_process: bool = True, *,
              experiment: str | None = None, run_name: str | None = None, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None, continue_run_id: str | None = None) -> Iterator[StageRun]:
    """Open the run for one stage execution; yields a no-op handle on non-main processes.

    ``experiment`` / ``run_name`` override the config's experiment and ``{stage}:{method}``;
    ``parent_run_id`` nests the run under a group run (``group_run``); ``tags`` are added to the standard ones;
    ``continue_run_id`` reopens that run (a resumed training: one run, one curve) instead of starting one.
    """
    if not main_process:
        yield StageRun(None, active=False)
        return
    mlflow = use_experiment(mlflow_cfg, experiment)
    name = run_name or f"{stage}:{method}"
    for run_id in close_dead_runs(mlflow, name):
        print(f"mlflow: run {run_id} ({name}) was left RUNNING by a process that died; marked FAILED", flush=True)
    all_tags = {"method": method, "stage": stage, "git_commit": git_commit(), "run_group": run_group(),
                "dvc_exp": os.environ.get("DVC_EXP_NAME", ""), "dvc_stage": os.environ.get("DVC_STAGE", ""),
                "host": socket.gethostname(), "pid": str(os.getpid()), **(tags or {})}
    opened = (mlflow.start_run(run_id=continue_run_id) if continue_run_id is not None else
              mlflow.start_run(run_name=name, tags=all_tags, parent_run_id=parent_run_id))
    with opened, sigterm_raises():  # a SIGTERM unwinds through `opened`, which marks the run FAILED
        if continue_run_id is not None:
            mlflow.set_tags(all_tags)  # this process's host and pid from now on
            print(f"mlflow: continuing run {continue_run_id} ({name})", flush=True)
        flat = {k: str(v)[:500] for k, v in flatten("", params).items()}
        logged = mlflow.MlflowClient().get_run(continue_run_id).data.params if continue_run_id else {}
        changed = sorted(k for k in flat if k in logged and logged[k] != flat[k])
        if changed:  # MLflow keeps a run's first value of a parameter
            print(f"mlflow: the continued run keeps its earlier values of {', '.join(changed)}", flush=True)
        mlflow.log_params({k: v for k, v in flat.items() if k not in logged})
        yield StageRun(mlflow, active=True)
