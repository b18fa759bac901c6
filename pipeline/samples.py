"""On-disk layout of sampled images, shared by the sample, score and report stages.

``{root}/{model}/{set}/{prompt:05d}/metadata.jsonl`` (the prompt's metadata line) and
``.../samples/{image:04d}.png`` — the layout the official GenEval evaluator reads — plus
``{root}/{model}/{set}/index.jsonl`` listing every image with its prompt and seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

INDEX = "index.jsonl"


def image_path(set_dir: Path, prompt_index: int, image_index: int) -> Path:
    return set_dir / f"{prompt_index:05d}" / "samples" / f"{image_index:04d}.png"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a partial file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(path: Path, image: np.ndarray) -> None:
    """Save a uint8 RGB ``[H, W, 3]`` image atomically as PNG."""
    import io

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_index(set_dir: Path, entries: list[dict]) -> None:
    """Write ``index.jsonl`` and each prompt folder's ``metadata.jsonl``."""
    seen = set()
    for e in entries:
        if e["prompt_index"] not in seen:
            seen.add(e["prompt_index"])
            meta = set_dir / f"{e['prompt_index']:05d}" / "metadata.jsonl"
            atomic_write_bytes(meta, (json.dumps(e["metadata"]) + "\n").encode())
    atomic_write_bytes(set_dir / INDEX, "".join(json.dumps(e) + "\n" for e in entries).encode())


def read_index(set_dir: Path) -> list[dict]:
    """Entries of ``index.jsonl``; a missing index or image is an error naming the file."""
    index = set_dir / INDEX
    if not index.is_file():
        raise FileNotFoundError(f"sample index not found: {index} (run the sample stage)")
    entries = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    for e in entries:
        if not (set_dir / e["path"]).is_file():
            raise FileNotFoundError(f"{index}: listed image missing: {set_dir / e['path']}")
    return entries


def load_image(path: Path) -> np.ndarray:
    """A PNG as uint8 RGB ``[H, W, 3]``."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
