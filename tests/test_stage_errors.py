"""A stage's error reaches the user as one line, `error: <stage>: <what> ...`, exit status 1, no traceback:
under `python -m`, under accelerate's launcher with `--quiet` (as dvc.yaml runs train, sample and dynamics) with one
and with two processes; SOAR_DEBUG=1 brings the traceback back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ACCELERATE_LAUNCH, free_port

from pipeline.config import read_params

pytestmark = pytest.mark.slow  # subprocesses

ROOT = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"



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
    cmd = [*ACCELERATE_LAUNCH, "--quiet", "--config_file",
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


WRITE_WEIGHTS = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import TINY_ARCH, TRAIN_CAPTIONS
from soar.finetune import save_model
from soar.models.bundle import load_bundle
from stages.common import run_main
bundle = load_bundle({model!r})
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # from here on no file may grow past 4 KiB
run_main("train", lambda method: save_model(bundle.transformer, Path({out!r}), None), "sft")
"""


def test_a_failed_weights_write_names_the_folder_and_leaves_nothing_half_written(tmp_path):
    """A write that the system refuses part-way (a file-size limit here, a full disk elsewhere: both fail the
    same write call) ends in one line naming the folder being written; no partial folder stays."""
    from helpers import write_tiny_training_world

    model, _, _ = write_tiny_training_world(tmp_path)
    out = tmp_path / "models" / "sft" / "transformer"
    code = WRITE_WEIGHTS.format(tests=str(ROOT / "tests"), model=str(model), out=str(out))
    proc = run(tmp_path, [sys.executable, "-c", code])
    assert proc.returncode == 1 and TRACEBACK not in proc.stderr, proc.stderr
    (line,) = error_lines(proc)
    assert line.startswith("error: train@sft: ") and f"while writing {out} (SOAR_DEBUG=1" in line, line
    assert not out.exists() and list(out.parent.iterdir()) == []  # no transformer/, no .transformer.tmp
