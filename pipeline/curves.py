"""Training-dynamics curves: the CSV the dynamics stage writes and the figure the report draws.

``{dynamics.out_dir}/{method}.csv``: a ``step`` column (0 = the base model), then one column per
metric, named as in the score stage's ``all_metrics.json``, in the results table's order; a metric a step
lacks is an empty cell. Values are written in full precision (Python's shortest round-trip repr).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.arms import ROW_NAMES
from pipeline.report import columns, header

STEP = "step"
PANEL_W, PANEL_H, MAX_COLS = 4.0, 3.0, 4  # inches per panel, panels per figure row
DPI = 100


def metric_columns(rows: Sequence[Mapping[str, float]]) -> list[str]:
    """The metrics of any row (``step`` excluded), in the results table's order."""
    return columns({str(i): {k: v for k, v in r.items() if k != STEP} for i, r in enumerate(rows)})


def write_curve(path: Path, rows: Sequence[Mapping[str, float]]) -> None:
    """Write ``rows`` (each ``{"step": N, metric: value, ...}``) as the curve CSV, in step order."""
    cols = metric_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([STEP, *cols])
    for r in sorted(rows, key=lambda r: r[STEP]):
        writer.writerow([int(r[STEP]), *(repr(float(r[c])) if c in r else "" for c in cols)])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue())


def read_curve(path: Path) -> list[dict[str, float]]:
    """The rows of a curve CSV: ``step`` as an int, the metrics as floats (empty cells left out)."""
    if not path.is_file():
        raise FileNotFoundError(f"training-dynamics curve not found: {path} (run the dynamics stage)")
    with path.open(newline="") as f:
        return [{k: int(v) if k == STEP else float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], labels: Mapping[str, str] | None = None):
    """A matplotlib ``Figure`` with one panel per metric and one line per method (``{method: rows}``), named by
    ``labels`` (default: the table's row names)."""
    labels = labels or {}
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    from matplotlib.ticker import MaxNLocator

    metrics = metric_columns([r for rows in curves.values() for r in rows])
    if not metrics:
        raise ValueError("no metrics to plot: the curves are empty")
    ncols = min(MAX_COLS, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(PANEL_W * ncols, PANEL_H * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        for method, rows in curves.items():
            points = [(r[STEP], r[metric]) for r in rows if metric in r]
            ax.plot(*zip(*points, strict=True), marker="o", label=labels.get(method, ROW_NAMES.get(method, method)))
        ax.set_title(header(metric))
        ax.set_xlabel("training step (0 = starting model)")
        ax.set_ylabel(header(metric))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        fig.delaxes(ax)
    axes[0].legend()
    fig.suptitle("Reward vs training step (0 = each arm's starting model): the snapshots of every arm sampled and "
                 "scored like the final models")
    return fig


def save_curves_png(curves: Mapping[str, Sequence[Mapping[str, float]]], path: Path,
                    labels: Mapping[str, str] | None = None) -> None:
    """``plot_curves`` saved as a PNG at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, labels).savefig(path, format="png")
