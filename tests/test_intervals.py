"""The results table's 95 % intervals against closed forms (float64) and their coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation import set_metrics
from pipeline.intervals import Z95, normal_mean, set_intervals, task_average, wilson
from soar.rewards import ScoreRecord
from soar.rewards.base import Scorer
from soar.rewards.geneval import GenEvalScorer


def test_wilson_closed_forms():
    lo, hi = wilson(50, 100)
    assert (round(lo, 5), round(hi, 5)) == (0.40383, 0.59617)  # the textbook 95 % interval of 50 / 100
    for n in (1, 12, 48, 553):
        lo, hi = wilson(0, n)
        # all wrong: (0, z² / (n + z²))
        assert lo == pytest.approx(0.0, abs=1e-15) and hi == pytest.approx(Z95**2 / (n + Z95**2), rel=1e-12)
        lo, hi = wilson(n, n)
        assert hi == pytest.approx(1.0, abs=1e-15) and lo == pytest.approx(n / (n + Z95**2), rel=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        wilson(0, 0)


def test_wilson_covers_about_95_percent():
    rng = np.random.default_rng(0)
    for p, n in ((0.02, 48), (0.19, 192), (0.5, 30)):
        k = rng.binomial(n, p, size=4000)
        covered = np.mean([lo <= p <= hi for lo, hi in (wilson(int(x), n) for x in k)])
        assert covered > 0.92, (p, n, covered)


def test_task_average_is_the_stated_formula_and_never_a_point():
    counts = {"single_object": (30, 32), "counting": (3, 40), "position": (0, 20)}
    z2 = Z95**2
    mean = (30 / 32 + 3 / 40 + 0 / 20) / 3
    var = sum((k + z2 / 2) / (n + z2) * (1 - (k + z2 / 2) / (n + z2)) / (n + z2) for k, n in counts.values())
    lo, hi = task_average(counts)
    assert lo == pytest.approx(mean - Z95 * math.sqrt(var) / 3, abs=1e-15)
    assert hi == pytest.approx(mean + Z95 * math.sqrt(var) / 3, abs=1e-15)
    zero_lo, zero_hi = task_average({"a": (0, 12), "b": (0, 12)})
    assert zero_lo == 0.0 and zero_hi > 0.05  # all wrong on 24 images: not "exactly 0"


def test_normal_mean():
    x = [22.1, 21.7, 22.9, 22.4]
    lo, hi = normal_mean(x)
    half = Z95 * float(np.std(x, ddof=1)) / 2
    assert (lo, hi) == pytest.approx((np.mean(x) - half, np.mean(x) + half), abs=1e-12)
    assert all(math.isnan(v) for v in normal_mean([1.0]))


class Mean(Scorer):
    name = "pickscore"

    def score(self, images, prompts, metadata):  # pragma: no cover - not called
        raise NotImplementedError


def test_names_and_estimates_match_the_metrics():
    """Every metric the score stage reports has an interval under the same name, containing the value."""
    rng = np.random.default_rng(1)
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    plan = {"geneval": ["geneval"], "drawbench": ["pickscore"], "other": ["pickscore"]}
    records = {"geneval": {"geneval": [ScoreRecord(float(rng.random() < 0.3), {"tag": tags[i % 6],
                                                                               "strict": bool(rng.random() < 0.2)})
                                       for i in range(60)]},
               "drawbench": {"pickscore": [ScoreRecord(float(v)) for v in rng.normal(22, 1, 20)]},
               "other": {"pickscore": [ScoreRecord(float(v)) for v in rng.normal(21, 1, 10)]}}
    scorers = {"geneval": GenEvalScorer(), "pickscore": Mean()}
    metrics = set_metrics(scorers, plan, records)
    rows = [{"set": s, "scorer": n, "score": r.score, "details": r.details}
            for s, by in records.items() for n, rs in by.items() for r in rs]
    intervals = set_intervals(rows)
    assert set(intervals) == set(metrics)  # geneval, geneval_strict, geneval/<tag>, {set}/pickscore
    assert "drawbench/pickscore" in intervals and "geneval/position" in intervals
    for key, value in metrics.items():
        lo, hi = intervals[key]
        assert lo <= value <= hi, key


def test_bounded_scores_are_checked():
    with pytest.raises(ValueError, match="outside"):
        set_intervals([{"set": "ocr", "scorer": "ocr", "score": 1.5, "details": {}}])
