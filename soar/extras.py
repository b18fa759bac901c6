"""Optional dependencies: imported on use, with an error naming the pyproject extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_extra(module: str, extra: str) -> ModuleType:
    """Import ``module``; when it is missing, say which extra installs it (``pip install -e '.[extra]'``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed here but not installed: pip install -e '.[{extra}]' "
                          f"(or pip install 'soar[{extra}]')") from exc
