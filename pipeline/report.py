"""The results table (rows base / +SFT / +SOAR, one column per metric) and the image grid."""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.sample_layout import load_image, read_index

MODELS = ("base", "sft", "soar")
ROW_NAMES = {"base": "base", "sft": "+SFT", "soar": "+SOAR"}
# metric key -> the paper's column name (docs/method.md#the-papers-numbers), in the paper's order
PAPER_COLUMNS = {"geneval": "GenEval", "ocr": "OCR", "pickscore": "PickScore", "clipscore": "ClipScore",
                 "hpsv21": "HPSv2.1", "aesthetic": "Aesthetic", "imagereward": "ImgRwd"}
CELL = 128  # grid cell side, pixels
LABEL_W = 280  # width of the prompt column in the grid, pixels


def columns(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Paper columns present in any model's metrics, then the other keys (per-tag etc.), sorted."""
    keys = set().union(*(m.keys() for m in metrics.values()))
    main = [k for k in PAPER_COLUMNS if k in keys]
    return main + sorted(keys - set(main))


def header(key: str) -> str:
    return PAPER_COLUMNS.get(key, key)


def results_table(metrics: Mapping[str, Mapping[str, float]]) -> tuple[str, str]:
    """(markdown, csv) with one row per model present, in the order base, +SFT, +SOAR."""
    cols = columns(metrics)
    models = [m for m in MODELS if m in metrics]
    md = ["| Model | " + " | ".join(header(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", *cols])
    for m in models:
        values = [metrics[m].get(c) for c in cols]
        md.append(f"| {ROW_NAMES[m]} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in values) + " |")
        writer.writerow([ROW_NAMES[m], *("" if v is None else f"{v:.6f}" for v in values)])
    return "\n".join(md) + "\n", buf.getvalue()


def comparison_grid(samples_root: Path, sets: Sequence[str], prompts_per_set: int,
               models: Sequence[str] = MODELS) -> Image.Image:
    """Rows: the first ``prompts_per_set`` prompts of each set (image 0, same seed); columns: models."""
    rows = []
    for set_name in sets:
        per_model = {m: read_index(samples_root / m / set_name) for m in models}
        first = [e for e in per_model[models[0]] if e["image_index"] == 0][:prompts_per_set]
        for e in first:
            cells = []
            for m in models:
                match = [x for x in per_model[m] if x["prompt_index"] == e["prompt_index"] and x["image_index"] == 0]
                if not match or match[0]["seed"] != e["seed"]:
                    raise ValueError(f"{samples_root / m / set_name}: prompt {e['prompt_index']} missing or seeded "
                                     "differently from the other models")
                cells.append(load_image(samples_root / m / set_name / match[0]["path"]))
            rows.append((e["prompt"], cells))
    font = ImageFont.load_default(size=14)
    grid = Image.new("RGB", (LABEL_W + CELL * len(models), 24 + CELL * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, m in enumerate(models):
        draw.text((LABEL_W + j * CELL + 8, 4), ROW_NAMES[m], fill="black", font=font)
    for i, (prompt, cells) in enumerate(rows):
        y = 24 + i * CELL
        draw.multiline_text((6, y + 6), "\n".join(textwrap.wrap(prompt, 34)[:6]), fill="black", font=font)
        for j, cell in enumerate(cells):
            tile = Image.fromarray(np.asarray(cell)).resize((CELL, CELL), Image.Resampling.NEAREST)
            grid.paste(tile, (LABEL_W + j * CELL, y))
    return grid


