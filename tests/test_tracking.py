"""MLflow tracking is robust: stages creating a new store at once, a run left RUNNING by a dead process, an
unreachable tracking server (fails in seconds, naming it) and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

from pipeline.config import MlflowConfig
from pipeline.tracking import stage_run

ROOT = Path(__file__).resolve().parents[1]

OPEN_RUN = """
import sys, time
from pipeline.config import MlflowConfig
from pipeline.tracking import stage_run
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
def test_a_run_left_running_by_a_dead_process_is_marked_killed(tmp_path, capsys):
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
    assert status.pop(stale.info.run_id) == "KILLED" and list(status.values()) == ["FINISHED"]


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
    assert status.pop(outer) == "RUNNING" and list(status.values()) == ["FINISHED"]  # not marked KILLED


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
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # the server needs a few seconds to start
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-2000:]
                time.sleep(0.5)
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
