"""A copy of this checkout in a temporary git repository, and running commands there (the end-to-end tests)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    """Run ``cmd`` in ``cwd``; its stdout + stderr, or an assertion error showing their tail."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-5000:]}"
    return out


def ran_stages(output: str) -> set[str]:
    """The DVC stages a `dvc repro` / `dvc exp run` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def copy_checkout(dest: Path) -> Path:
    """Copy the files git knows of (tracked and untracked-not-ignored) to ``dest``, without ``dvc.lock``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    return dest


def commit_all(dest: Path, message: str) -> dict:
    """``git init`` + commit everything in ``dest``; returns the environment the commands there run with
    (this interpreter's scripts first on PATH, MLflow in a sqlite file beside ``dest``)."""
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_TRACKING_URI=f"sqlite:///{dest.parent / 'mlflow.db'}", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", message]):
        run(cmd, dest, env)
    return env
