"""On-disk layout of sampled images, shared by the sample, score and report stages.

``{root}/{model}/{set}/{prompt:05d}/metadata.jsonl`` (the prompt's metadata line) and
``.../samples/{image:04d}.png`` — the layout the official GenEval evaluator reads — plus
``{root}/{model}/{set}/index.jsonl`` listing every image with its prompt and seed, and
``{root}/{model}/{set}/sampling.json``: what made the images (model digest, sampler settings,
prompts), so a rerun reuses images on disk only when they would come out the same.

Every file is written atomically (``soar.atomic``: a temporary file in the same folder, renamed), so
a PNG at its final path is complete; a killed run can leave only temporary files, which
``prepare_set_dir`` removes before the next run writes anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from soar import atomic

INDEX = "index.jsonl"
SETTINGS = "sampling.json"

log = logging.getLogger(__name__)


def image_path(set_dir: Path, prompt_index: int, image_index: int) -> Path:
    return set_dir / f"{prompt_index:05d}" / "samples" / f"{image_index:04d}.png"


def save_png(path: Path, image: np.ndarray) -> None:
    """Save a uint8 RGB ``[H, W, 3]`` image atomically as PNG."""
    import io

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    atomic.write_bytes(path, buf.getvalue())


def missing(set_dir: Path, entries: list[dict]) -> list[dict]:
    """The entries whose PNG is not on disk yet (a PNG at its final path is complete: see module doc)."""
    return [e for e in entries if not (set_dir / e["path"]).is_file()]


def prepare_set_dir(set_dir: Path, settings: dict) -> int:
    """Make ``set_dir`` ready for a (resumed) run with ``settings``; returns the PNGs kept.

    Images on disk are kept only when ``sampling.json`` records the same settings; otherwise (other
    weights, steps, seed, prompts, ...) the folder is emptied first. Stale temporaries are removed.
    Call on one process, before any process writes into ``set_dir``.
    """
    recorded = set_dir / SETTINGS
    if set_dir.exists():
        old = json.loads(recorded.read_text()) if recorded.is_file() else None
        if old != settings:
            if old is not None or any(set_dir.rglob("*.png")):
                changed = "no " + SETTINGS if old is None else ", ".join(
                    sorted(k for k in {*settings, *old} if old.get(k) != settings.get(k)))
                log.warning("%s: images on disk were made otherwise (%s); sampling them again", set_dir, changed)
            shutil.rmtree(set_dir)
    removed = atomic.remove_temporaries(set_dir)
    if removed:
        log.info("%s: removed %d partial file(s) of an interrupted run", set_dir, removed)
    if not recorded.is_file():
        atomic.write_bytes(recorded, (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode())
    return sum(1 for _ in set_dir.rglob("*.png"))


def copy_same_settings(set_dir: Path, donor: Path, entries: list[dict]) -> int:
    """Copy into ``set_dir`` the missing PNGs of ``entries`` that ``donor`` holds, when ``donor``'s ``sampling.json``
    equals ``set_dir``'s (same weights' bytes, sampler settings, prompts and seeds: the images sampling would
    make); returns the number copied (0 when the settings differ or ``donor`` has none). Call after
    ``prepare_set_dir``, on one process."""
    mine, theirs = set_dir / SETTINGS, donor / SETTINGS
    if not theirs.is_file() or json.loads(theirs.read_text()) != json.loads(mine.read_text()):
        return 0
    copied = 0
    for e in missing(set_dir, entries):
        source = donor / e["path"]
        if source.is_file():
            atomic.write_bytes(set_dir / e["path"], source.read_bytes())
            copied += 1
    return copied


def folder_digest(folder: Path, content: bool = True) -> str:
    """SHA-256 over the relative names, sizes and (``content``) bytes of every file under ``folder``."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(folder).as_posix()}\0{p.stat().st_size}\0".encode())
        if content:
            with p.open("rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()


def write_index(set_dir: Path, entries: list[dict]) -> None:
    """Write ``index.jsonl`` and each prompt folder's ``metadata.jsonl``."""
    seen = set()
    for e in entries:
        if e["prompt_index"] not in seen:
            seen.add(e["prompt_index"])
            meta = set_dir / f"{e['prompt_index']:05d}" / "metadata.jsonl"
            atomic.write_bytes(meta, (json.dumps(e["metadata"]) + "\n").encode())
    atomic.write_bytes(set_dir / INDEX, "".join(json.dumps(e) + "\n" for e in entries).encode())


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
