"""Statistics of the multi-seed study: mean ± std over seeds, the Welch interval of a difference of two groups
and the one-sample interval of a group's shift from one exact value.

Pure functions over plain sequences of floats (one value per seed); no files, no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof = 1; NaN for one value) of ``n`` values."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Difference:
    """``mean(b) - mean(a)`` with its two-sided Welch confidence interval ``[low, high]`` and degrees of freedom."""

    diff: float
    low: float
    high: float
    dof: float
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample std of ``values`` (at least one)."""
    x = [float(v) for v in values]
    if not x:
        raise ValueError("summarize: no values")
    mean = math.fsum(x) / len(x)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (len(x) - 1)) if len(x) > 1 else math.nan
    return Summary(mean, std, len(x))


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Difference:
    """Welch interval for ``mean(b) - mean(a)`` (unequal variances; each group needs >= 2 values).

    se = sqrt(s_a^2 / n_a + s_b^2 / n_b); Welch–Satterthwaite dof = se^4 / ((s_a^2/n_a)^2/(n_a-1) +
    (s_b^2/n_b)^2/(n_b-1)); interval = diff ± t_{(1+confidence)/2, dof} se. When both groups have zero
    spread (e.g. a metric at 0 for every seed) the interval is the point ``[diff, diff]`` with dof NaN.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"welch_difference: confidence must be in (0, 1), got {confidence}")
    sa, sb = summarize(a), summarize(b)
    if sa.n < 2 or sb.n < 2:
        raise ValueError(f"welch_difference: need >= 2 values per group, got {sa.n} and {sb.n}")
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    diff = sb.mean - sa.mean
    if va + vb == 0:
        return Difference(diff, diff, diff, math.nan, confidence)
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, dof)) * se
    return Difference(diff, diff - half, diff + half, dof, confidence)


def shift_from(values: Sequence[float], reference: float, confidence: float = 0.95) -> Difference:
    """``mean(values) - reference`` with its two-sided one-sample t interval (``reference`` is one exact value,
    e.g. the base model's score): diff ± t_{(1+confidence)/2, n-1} s / sqrt(n), n >= 2; zero spread gives the
    point ``[diff, diff]`` with dof NaN."""
    if not 0 < confidence < 1:
        raise ValueError(f"shift_from: confidence must be in (0, 1), got {confidence}")
    sv = summarize(values)
    if sv.n < 2:
        raise ValueError(f"shift_from: need >= 2 values, got {sv.n}")
    diff = sv.mean - float(reference)
    if sv.std == 0:
        return Difference(diff, diff, diff, math.nan, confidence)
    half = float(stats.t.ppf((1 + confidence) / 2, sv.n - 1)) * sv.std / math.sqrt(sv.n)
    return Difference(diff, diff - half, diff + half, float(sv.n - 1), confidence)
