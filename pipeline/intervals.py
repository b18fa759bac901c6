"""95 % intervals of the results table's metrics, in closed form, from the score stage's per-image rows.

Every image is one observation (the sets' prompts are the population the metric is about; an interval says
how far another draw of images of the same prompts and model could move the number):

- a proportion ``k / n`` (a GenEval tag's accuracy): the Wilson score interval;
- a mean of scores in [0, 1] (OCR): the Wilson interval of ``sum / n``, which is conservative, because a
  variable in [0, 1] with mean p has variance at most p (1 - p); unlike a normal interval it does not
  collapse to a point when every image scores 0;
- GenEval's task average (the mean over T tags of their accuracies) and its strict variant: tags are
  disjoint sets of images, so variances add: ``mean ± z sqrt(sum_t var_t) / T`` with each tag's variance
  ``p~ (1 - p~) / (n + z^2)`` at the Agresti-Coull centre ``p~ = (k + z^2 / 2) / (n + z^2)`` (never zero),
  clipped to [0, 1];
- any other mean (PickScore, ClipScore, HPSv2.1, Aesthetic, ImageReward): ``mean ± z s / sqrt(n)``.

Metric names follow ``pipeline.evaluation.set_metrics``: a scorer used on several sets gets ``{set}/``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054  # the two-sided 95 % quantile of the standard normal
Interval = tuple[float, float]


def wilson(k: float, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of the proportion ``k / n`` (``k`` may be a sum of scores in [0, 1])."""
    if n < 1:
        raise ValueError(f"wilson: need at least one observation, got n = {n}")
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def task_average(counts: Mapping[str, tuple[float, int]], z: float = Z95) -> Interval:
    """Interval of the mean over tags of ``k_t / n_t`` (``counts``: tag -> (k_t, n_t)); see the module doc."""
    if not counts:
        raise ValueError("task_average: no tags")
    z2 = z * z
    mean = sum(k / n for k, n in counts.values()) / len(counts)
    var = sum(((k + z2 / 2) / (n + z2)) * (1 - (k + z2 / 2) / (n + z2)) / (n + z2) for k, n in counts.values())
    half = z * math.sqrt(var) / len(counts)
    return max(0.0, mean - half), min(1.0, mean + half)


def normal_mean(values: Sequence[float], z: float = Z95) -> Interval:
    """``mean ± z s / sqrt(n)`` (``s`` with n - 1); NaN bounds for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan, math.nan
    half = z * float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()) - half, float(x.mean()) + half


def geneval_intervals(name: str, rows: Sequence[Mapping]) -> dict[str, Interval]:
    """``geneval``, ``geneval_strict`` and ``geneval/<tag>`` (the names of ``aggregate_geneval``)."""
    correct: dict[str, list[float]] = defaultdict(list)
    strict: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        correct[r["details"]["tag"]].append(float(r["score"] > 0.5))
        strict[r["details"]["tag"]].append(float(bool(r["details"]["strict"])))
    out = {"geneval": task_average({t: (sum(v), len(v)) for t, v in correct.items()}),
           "geneval_strict": task_average({t: (sum(v), len(v)) for t, v in strict.items()})}
    out.update({f"geneval/{t}": wilson(sum(v), len(v)) for t, v in sorted(correct.items())})
    return out


def bounded_intervals(name: str, rows: Sequence[Mapping]) -> dict[str, Interval]:
    """The mean of scores in [0, 1] (Wilson, conservative)."""
    scores = [float(r["score"]) for r in rows]
    if any(not 0.0 <= s <= 1.0 for s in scores):
        raise ValueError(f"{name}: a score outside [0, 1]; its interval assumes bounded scores")
    return {name: wilson(sum(scores), len(scores))}


def mean_intervals(name: str, rows: Sequence[Mapping]) -> dict[str, Interval]:
    return {name: normal_mean([float(r["score"]) for r in rows])}


# scorer -> how its metrics' intervals are computed; scorers not listed have one unbounded mean
INTERVALS: Mapping[str, Callable[[str, Sequence[Mapping]], dict[str, Interval]]] = {
    "geneval": geneval_intervals, "ocr": bounded_intervals}


def set_intervals(rows: Sequence[Mapping]) -> dict[str, Interval]:
    """Intervals of every metric of a model, from its ``scores.jsonl`` rows (set, scorer, score, details)."""
    groups: dict[tuple[str, str], list[Mapping]] = defaultdict(list)
    for r in rows:
        groups[(r["set"], r["scorer"])].append(r)
    uses = Counter(scorer for _, scorer in groups)
    out: dict[str, Interval] = {}
    for (set_name, scorer), found in groups.items():
        prefix = f"{set_name}/" if uses[scorer] > 1 else ""
        intervals = INTERVALS.get(scorer, mean_intervals)(scorer, found)
        out.update({prefix + k: v for k, v in intervals.items()})
    return out
