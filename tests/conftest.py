"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64_default():
    """Make float64 the default dtype for one test (math checks), then restore it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
