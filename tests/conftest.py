"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROMPT_FILES_ENV = "SOAR_PROMPT_FILES_DIR"


def share_the_cores() -> None:
    """Under pytest-xdist (``pytest -n N``) each worker and the processes its tests start (stages under
    ``dvc repro``, ``accelerate launch``, gloo groups) get the machine's cores divided by the workers, so
    N workers never run more compute threads than there are cores (OpenMP threads waiting on each other
    across oversubscribed cores cost more than they add). A value the user set stays."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


share_the_cores()

# The longest modules (minutes each), moved to the front so that ``pytest -n 2 --dist loadfile`` starts them at
# once, one per worker, and the short modules fill in around them (pyproject.toml keeps this order for xdist)
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_paper_e2e.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order


@pytest.fixture
def float64_default():
    """Make float64 the default dtype for one test (math checks), then restore it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def public_prompt_files() -> Path:
    """The folder named by ``SOAR_PROMPT_FILES_DIR``: the public prompt files under their table names.

    The layout is the ``prompt_files`` stage's ``out_dir`` (e.g. ``geneval/evaluation_metadata.jsonl``).
    Tests that use it carry the ``public_data`` marker and skip, saying what to set, when it is unset.
    """
    value = os.environ.get(PROMPT_FILES_ENV)
    if not value:
        pytest.skip(f"needs the public prompt files: set {PROMPT_FILES_ENV} to a folder holding them under "
                    "their table names (the prompt_files stage's out_dir layout)")
    folder = Path(value)
    if not folder.is_dir():
        pytest.fail(f"{PROMPT_FILES_ENV}={value}: no such folder")
    return folder
