"""A stage's error reaches the user as one line, `error: <stage>: <what> ...`, exit status 1, no traceback:
under `python -m`, under `accelerate launch --quiet` (as dvc.yaml runs train, sample and dynamics) with one
and with two processes; SOAR_DEBUG=1 brings the traceback back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import read_params

pytestmark = pytest.mark.slow  # subprocesses

ROOT = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder whose params.yaml names a model folder that does not exist."""
    work = tmp_path_factory.mktemp("errors")
    params = read_params(ROOT / "params.yaml")
    params["model"]["base_path"] = "missing/model"
    params["mlflow"]["tracking_uri"] = f"sqlite:///{work / 'mlflow.db'}"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def run(work: Path, cmd: list[str], debug: bool = False, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SOAR_DEBUG"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra, **({"SOAR_DEBUG": "1"} if debug else {}))
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_python_m_prints_one_line(work):
    proc = run(work, [sys.executable, "-m", "stages.train", "sft"])
    assert proc.returncode == 1
    assert TRACEBACK not in proc.stderr, proc.stderr
    assert error_lines(proc) == ["error: train@sft: model folder not found: missing/model "
                                 "(SOAR_DEBUG=1 shows the traceback)"], proc.stderr


def test_a_config_error_is_one_line_too(work):
    params = read_params(work / "params.yaml")
    params["sample"]["guidance_scale"] = float("nan")
    (work / "nan.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run(work, [sys.executable, "-m", "stages.sample", "base"], SOAR_PARAMS="nan.yaml")
    assert proc.returncode == 1 and TRACEBACK not in proc.stderr, proc.stderr
    assert error_lines(proc) == ["error: sample@base: nan.yaml.sample.guidance_scale: must be a finite number, "
                                 "got nan (SOAR_DEBUG=1 shows the traceback)"], proc.stderr


@pytest.mark.parametrize(("config", "processes"), [("cpu.yaml", 1), ("cpu_multi.yaml", 2)])
def test_accelerate_launch_quiet_prints_the_line_without_tracebacks(work, config, processes):
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--quiet", "--config_file",
           str(ROOT / "pipeline" / "launch" / config), "--num_processes", str(processes), "--num_machines", "1",
           "--main_process_port", str(free_port()), "-m", "stages.train", "soar"]
    proc = run(work, cmd)
    assert proc.returncode == 1
    assert TRACEBACK not in proc.stdout + proc.stderr, proc.stderr
    if processes == 1:
        assert error_lines(proc) == ["error: train@soar: model folder not found: missing/model "
                                     "(SOAR_DEBUG=1 shows the traceback)"], proc.stderr
    else:  # each process says which it is
        assert sorted(error_lines(proc)) == [f"error: train@soar (process {r}): model folder not found: missing/model "
                                             "(SOAR_DEBUG=1 shows the traceback)" for r in range(2)], proc.stderr


def test_soar_debug_shows_the_traceback(work):
    proc = run(work, [sys.executable, "-m", "stages.train", "sft"], debug=True)
    assert proc.returncode == 1
    assert TRACEBACK in proc.stderr and "FileNotFoundError: model folder not found: missing/model" in proc.stderr
    assert error_lines(proc) == []
