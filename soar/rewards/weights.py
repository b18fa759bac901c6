"""Where scorer weights come from, and optional dependencies: one place, one kind of error.

Every learned scorer reads its weights from a local path named in ``params.yaml``
(``score.checkpoints.<key>``). A missing path is an error naming that param and the file the
scorer expects there; a hub download happens only when the user sets ``score.allow_download: true``
(then the published hub id is returned, and the loader fetches it).

Heavy optional dependencies (open_clip, timm, ...) are imported through ``import_extra``
(``soar.extras``), whose error names the pyproject extra that installs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from soar.extras import import_extra

__all__ = ["PARAM_PREFIX", "fetch_file", "locate", "import_extra", "torch_dtype"]

PARAM_PREFIX = "score.checkpoints"


def locate(checkpoints: Mapping[str, str | None], key: str, *, expect: Sequence[str] = (),
           hub_id: str | None = None, allow_download: bool = False, what: str = "") -> str:
    """The local path for weights ``key`` (a file, or a folder holding every name in ``expect``).

    ``checkpoints``: ``score.checkpoints`` as a mapping (key -> path or None). ``hub_id``: the
    published id, returned instead of a path only when the path is unset and ``allow_download``.
    Raises ``FileNotFoundError`` naming ``score.checkpoints.<key>`` and the expected file(s).
    """
    param = f"{PARAM_PREFIX}.{key}"
    if key not in checkpoints:
        raise KeyError(f"{param}: no such checkpoint key; known: {', '.join(sorted(checkpoints))}")
    path = checkpoints[key]
    label = f" ({what})" if what else ""
    expected = f" containing {', '.join(expect)}" if expect else ""
    if path is None:
        if allow_download and hub_id is not None:
            return hub_id
        source = f" a local copy of {hub_id}" if hub_id else " the local weights"
        raise FileNotFoundError(
            f"{param} is null: set it to{source}{label}{expected}"
            + (", or set score.allow_download: true to fetch it" if hub_id else ""))
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{param}: {p} does not exist (expected{label}{expected or ' a file'})")
    missing = [name for name in expect if not (p / name).exists()] if p.is_dir() else []
    if expect and not p.is_dir():
        raise FileNotFoundError(f"{param}: {p} is a file; expected a folder{label}{expected}")
    if missing:
        raise FileNotFoundError(f"{param}: {p} lacks {', '.join(missing)} (expected a folder{label}{expected})")
    return str(p)


def fetch_file(located: str, hub_id: str, filename: str) -> str:
    """``locate``'s answer -> a local file: a hub id (returned only when downloads are allowed) is fetched."""
    if located != hub_id or Path(located).exists():
        return located
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=hub_id, filename=filename)


def torch_dtype(dtype: str) -> torch.dtype:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` ... -> the torch floating dtype."""
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must name a torch floating dtype (e.g. float32, bfloat16), got {dtype!r}")
    return value
