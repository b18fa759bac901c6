"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROMPT_FILES_ENV = "SOAR_PROMPT_FILES_DIR"


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
