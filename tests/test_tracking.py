"""MLflow tracking is robust: stages creating a new store at once, a run left RUNNING by a dead process, an
unreachable tracking server (fails in seconds, naming it) and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, start_mlflow_server

from pipeline.config import MlflowConfig
from pipeline.tracking import run_group, stage_run

ROOT = Path(__file__).resolve().parents[1]

OPEN_RUN = """
import sys, time
from pipeline.config import MlflowConfig
from pipeline.tracking import run_group, stage_run
cfg = MlflowConfig(tracking_uri=sys.argv[1], experiment="race")
with stage_run(cfg, "score", sys.argv[2], {{"n": 1}}) as run:
    run.log_metrics({{"x": 1.0}})
    {then}
"""



def python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def runs(uri: str, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.mark.slow
def test_stages_creating_a_new_store_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    procs = [python(OPEN_RUN.format(then="pass"), uri, f"m{i}") for i in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
    assert sorted(r.info.run_name for r in runs(uri, "race")) == ["score:m0", "score:m1", "score:m2"]


@pytest.mark.slow
def test_a_run_left_running_by_a_dead_process_is_marked_failed(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = python(OPEN_RUN.format(then="print('open', flush=True); time.sleep(600)"), uri, "base")
    assert killed.stdout.readline().strip() == "open", killed.stderr.read()
    killed.kill()  # SIGKILL: the run cannot close itself
    killed.wait()
    (stale,) = runs(uri, "race")
    assert stale.info.status == "RUNNING"
    with stage_run(MlflowConfig(tracking_uri=uri, experiment="race"), "score", "base", {}) as run:
        run.log_metrics({"x": 2.0})
    assert f"run {stale.info.run_id} (score:base) was left RUNNING" in capsys.readouterr().out
    status = {r.info.run_id: r.info.status for r in runs(uri, "race")}
    assert status.pop(stale.info.run_id) == "FAILED" and list(status.values()) == ["FINISHED"]


@pytest.mark.slow
def test_a_stage_stopped_by_sigterm_marks_its_run_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stopped = python(OPEN_RUN.format(then="print('open', flush=True); time.sleep(600)"), uri, "base")
    assert stopped.stdout.readline().strip() == "open", stopped.stderr.read()
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=60) == 143
    (run,) = runs(uri, "race")
    assert run.info.status == "FAILED" and run.data.metrics == {"x": 1.0}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process: untouched by the import


def test_the_default_store_keeps_artifacts_relative_to_the_repository(tmp_path, monkeypatch):
    """A store at the repository root gets the artifact root ``mlruns``: moving the folder moves the artifacts."""
    import mlflow

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "table.md").write_text("| a |\n")
    with stage_run(MlflowConfig(experiment="moved"), "report", "all", {}) as run:
        run.log_artifact(tmp_path / "table.md", "tables")
        run.set_description("## results")
        run_id = run.run_id
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    got = client.get_run(run_id)
    assert client.get_experiment(got.info.experiment_id).artifact_location == "mlruns"
    assert got.info.artifact_uri == f"mlruns/{run_id}/artifacts"
    assert (tmp_path / got.info.artifact_uri / "tables" / "table.md").read_text() == "| a |\n"
    assert got.data.tags["mlflow.note.content"] == "## results" and got.data.tags["run_group"].startswith("repro-")


def test_a_store_outside_the_repository_keeps_absolute_artifact_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with stage_run(MlflowConfig(tracking_uri=uri, experiment="abs"), "score", "base", {}) as run:
        artifact_uri = run._mlflow.get_artifact_uri()
    assert artifact_uri.startswith((tmp_path / "repo" / "mlruns").as_uri())


def test_run_group_is_the_dvc_experiment_or_a_digest_of_commit_and_params(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    first = run_group()
    assert first == run_group() and first.startswith("repro-") and len(first) == len("repro-") + 7
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert run_group() != first
    monkeypatch.setenv("DVC_EXP_NAME", "tawny-gaby")
    assert run_group() == "tawny-gaby"


def test_a_running_run_of_a_live_process_is_left_alone(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = MlflowConfig(tracking_uri=uri, experiment="live")
    with stage_run(cfg, "score", "base", {}):
        import mlflow

        outer = mlflow.active_run().info.run_id
        mlflow.end_run()  # leave the slot free; the run itself is still RUNNING and its process (this one) alive
        mlflow.MlflowClient().set_terminated(outer, status="RUNNING")
        with stage_run(cfg, "score", "base", {}):
            pass
    status = {r.info.run_id: r.info.status for r in runs(uri, "live")}
    assert status.pop(outer) == "RUNNING" and list(status.values()) == ["FINISHED"]  # not marked FAILED


def test_an_unreachable_server_fails_in_seconds_naming_it():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tic = time.perf_counter()
    with pytest.raises(RuntimeError, match=rf"MLflow tracking server {uri} does not answer .*; start it, or set "
                                           r"mlflow\.tracking_uri: null"):
        with stage_run(MlflowConfig(tracking_uri=uri, experiment="x"), "score", "base", {}):
            pass
    assert time.perf_counter() - tic < 30


@pytest.mark.slow
def test_a_real_server_on_localhost_gets_the_run(tmp_path):
    port = free_port()
    server = start_mlflow_server(f"sqlite:///{tmp_path / 'srv.db'}", tmp_path, port,
                                 "--default-artifact-root", str(tmp_path / "artifacts"))
    uri = f"http://127.0.0.1:{port}"
    try:
        with stage_run(MlflowConfig(tracking_uri=uri, experiment="served"), "score", "base", {"a": 1}) as run:
            run.log_metrics({"geneval": 0.5})
        (served,) = runs(uri, "served")
        assert served.info.status == "FINISHED" and served.data.metrics == {"geneval": 0.5}
        assert served.data.tags["pid"] == str(os.getpid()) and served.data.tags["host"] == socket.gethostname()
    finally:
        server.terminate()
        server.wait(timeout=30)


KILLED_TRAINING = """
import os, sys
sys.path.insert(0, {tests!r})
import soar.checkpoint as ck
import test_tracking as t
original = ck.save_checkpoint
def save_then_die(accelerator, root, step, *args, **kwargs):
    path = original(accelerator, root, step, *args, **kwargs)
    if step == 2:
        os._exit(17)  # killed right after step 2's checkpoint
    return path
ck.save_checkpoint = save_then_die
t.train_tiny({work!r})
"""


def train_tiny(work: str) -> None:
    """4 steps of the tiny model through ``run_training`` (the train stage's path), checkpoints every 2."""
    import json

    from helpers import write_tiny_training_world

    from pipeline.training import run_training
    from soar.models.bundle import load_bundle
    from soar.train_config import TrainConfig

    work = Path(work)
    jsonl = work / "train.jsonl"
    if not jsonl.exists():  # the first (killed) run makes the world
        _, _, records = write_tiny_training_world(work)
        jsonl.write_text("".join(json.dumps({"md5": r.md5, "caption_en": r.caption, "bw": r.bw, "bh": r.bh}) + "\n"
                                 for r in records))
    loop = TrainConfig(max_train_steps=4, train_batch_size=2, checkpointing_steps=2, snapshot_steps=0,
                       validation_steps=0, log_every=1, resume_from_checkpoint="latest", learning_rate=1e-3)
    run_training(load_bundle(work / "model"), loop, None, jsonl, work / "images", work / "out", stage="train",
                 method="sft", mlflow_cfg=MlflowConfig(tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
                                                       experiment="resume"), params={"train": loop})


@pytest.mark.slow
def test_a_resumed_training_continues_its_run(tmp_path):
    killed = python(KILLED_TRAINING.format(tests=str(ROOT / "tests"), work=str(tmp_path)))
    assert killed.wait(timeout=300) == 17, killed.stderr.read()[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (first,) = runs(uri, "resume")
    assert first.info.status == "RUNNING"
    train_tiny(str(tmp_path))  # resumes from checkpoint-2
    (run,) = runs(uri, "resume")  # the same run, not a second one
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    import mlflow

    steps = [m.step for m in mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4]  # the whole curve in one run
