"""The results table in the paper's layout (rows: the reference models, then base, + SFT, + SOAR, + GRPO;
columns: Model, #Iter, one per metric) and the image grid."""

from __future__ import annotations

import csv
import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.arms import MODELS, ROW_NAMES, row_name
from pipeline.grids import label_font
from pipeline.sample_layout import load_image, read_index

NOT_TRAINED = "–"  # the #Iter cell of a model not trained here
# metric key -> the paper's column name (docs/method.md#the-papers-numbers), in the paper's order
PAPER_COLUMNS = {"geneval": "GenEval", "ocr": "OCR", "pickscore": "PickScore", "clipscore": "ClipScore",
                 "hpsv21": "HPSv2.1", "aesthetic": "Aesthetic", "imagereward": "ImgRwd"}
CELL = 128  # grid cell side, pixels
LABEL_W = 280  # width of the prompt column in the grid, pixels


@dataclass(frozen=True)
class Row:
    """One row of the results table."""

    model: str  # folder name under the samples and scores folders (base, sft, soar, grpo or a reference's name)
    label: str  # the Model cell
    iterations: str  # the #Iter cell: training steps of the model, NOT_TRAINED for the others


def iterations(steps: int) -> str:
    """The #Iter cell for ``steps`` training steps: ``10k`` for 10000, else the number."""
    return f"{steps // 1000}k" if steps >= 1000 and steps % 1000 == 0 else str(steps)


def table_rows(references: Mapping[str, object], train_steps: int, grpo_steps: int, grpo_init_from: str) -> list[Row]:
    """The reference models in ``params.yaml`` order (each with its ``label``), then base, + SFT, + SOAR
    (``train_steps`` each) and + GRPO (``grpo_steps``; ``+ SOAR + GRPO`` when it started from SOAR,
    ``grpo.init_from``)."""
    refs = [Row(name, ref.label, NOT_TRAINED) for name, ref in references.items()]
    trained = iterations(train_steps)
    return refs + [Row("base", ROW_NAMES["base"], NOT_TRAINED), Row("sft", ROW_NAMES["sft"], trained),
                   Row("soar", ROW_NAMES["soar"], trained),
                   Row("grpo", row_name("grpo", grpo_init_from), iterations(grpo_steps))]


def columns(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Paper columns present in any model's metrics, then the other keys (per-tag etc.), sorted."""
    keys = set().union(*(m.keys() for m in metrics.values()))
    main = [k for k in PAPER_COLUMNS if k in keys]
    return main + sorted(keys - set(main))


def header(key: str) -> str:
    return PAPER_COLUMNS.get(key, key)


def cell(value: float | None, interval: tuple[float, float] | None) -> str:
    """A table cell: ``0.1510 (0.103–0.216)`` (the value, its 95 % interval), ``–`` for a missing value."""
    if value is None:
        return "–"
    if interval is None or any(math.isnan(b) for b in interval):
        return f"{value:.4f}"
    return f"{value:.4f} ({interval[0]:.3f}–{interval[1]:.3f})"


def results_table(metrics: Mapping[str, Mapping[str, float]], rows: Sequence[Row],
                  intervals: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> tuple[str, str]:
    """(markdown, csv): one line per row whose model has metrics, in ``rows`` order; columns Model, #Iter, then
    ``columns(metrics)``, each cell with its 95 % interval from ``intervals`` (model -> metric -> (lo, hi);
    ``pipeline.intervals``) in parentheses, the csv with ``<metric>_lo`` / ``<metric>_hi`` columns; a metric a
    model lacks is ``–`` (empty in the csv)."""
    cols, intervals = columns(metrics), intervals or {}
    md = ["| Model | #Iter | " + " | ".join(header(c) for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", "iterations", *(k for c in cols for k in (c, f"{c}_lo", f"{c}_hi"))])
    for row in (r for r in rows if r.model in metrics):
        values = [metrics[row.model].get(c) for c in cols]
        bounds = [intervals.get(row.model, {}).get(c) for c in cols]
        md.append(f"| {row.label} | {row.iterations} | "
                  + " | ".join(cell(v, b) for v, b in zip(values, bounds, strict=True)) + " |")
        writer.writerow([row.label, row.iterations, *(
            "" if x is None or math.isnan(x) else f"{x:.6f}"
            for v, b in zip(values, bounds, strict=True) for x in (v, *(b or (None, None))))])
    return "\n".join(md) + "\n", buf.getvalue()


def comparison_grid(samples_root: Path, sets: Sequence[str], prompts_per_set: int,
                    models: Sequence[str] = MODELS, labels: Sequence[str] | None = None) -> Image.Image:
    """Rows: the first ``prompts_per_set`` prompts of each set (image 0, same seed); columns: ``models``, headed
    ``labels`` (default: their row names)."""
    labels = [ROW_NAMES.get(m, m) for m in models] if labels is None else list(labels)
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
    font = label_font(14)
    grid = Image.new("RGB", (LABEL_W + CELL * len(models), 24 + CELL * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(labels):
        draw.text((LABEL_W + j * CELL + 8, 4), label[:16], fill="black", font=font)
    for i, (prompt, cells) in enumerate(rows):
        y = 24 + i * CELL
        draw.multiline_text((6, y + 6), "\n".join(textwrap.wrap(prompt, 34)[:6]), fill="black", font=font)
        for j, cell in enumerate(cells):
            tile = Image.fromarray(np.asarray(cell)).resize((CELL, CELL), Image.Resampling.NEAREST)
            grid.paste(tile, (LABEL_W + j * CELL, y))
    return grid


