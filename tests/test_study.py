"""The study's statistics and tables (closed forms, float64) and its run naming."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from pipeline.config import parse_config, read_params
from pipeline.study_report import drift_series, grpo_table, headline_metrics, main_table, sweep_table, verdict
from pipeline.study_stats import Difference, shift_from, summarize, welch_difference
from pipeline.study_variants import BASE, find_variant, seed_variants, sweep_variants

ROOT = Path(__file__).resolve().parents[1]


def test_summarize_matches_numpy():
    x = [0.1, 0.4, 0.25, 0.3]
    s = summarize(x)
    assert s.n == 4 and s.mean == pytest.approx(np.mean(x), abs=1e-15)
    assert s.std == pytest.approx(np.std(x, ddof=1), abs=1e-15)
    assert math.isnan(summarize([3.0]).std)
    with pytest.raises(ValueError, match="no values"):
        summarize([])


@pytest.mark.parametrize("a,b,conf", [([0.1, 0.2, 0.15], [0.3, 0.35, 0.2], 0.95),
                                      ([1.0, 2.0, 4.0, 3.0], [0.5, 0.7], 0.9),
                                      ([0.0, 0.0, 1e-3], [0.2, 0.1, 0.4], 0.99)])
def test_welch_interval_matches_scipy_and_closed_form(a, b, conf):
    d = welch_difference(a, b, conf)
    ref = stats.ttest_ind(b, a, equal_var=False).confidence_interval(conf)
    assert d.diff == pytest.approx(np.mean(b) - np.mean(a), abs=1e-14)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)  # Welch-Satterthwaite by hand
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    assert d.dof == pytest.approx(dof, rel=1e-12)
    assert d.high - d.diff == pytest.approx(stats.t.ppf((1 + conf) / 2, dof) * math.sqrt(va + vb), rel=1e-12)


def test_welch_degenerate_and_bad_input():
    d = welch_difference([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert (d.diff, d.low, d.high) == (0.0, 0.0, 0.0) and math.isnan(d.dof) and not d.excludes_zero
    with pytest.raises(ValueError, match=">= 2 values"):
        welch_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        welch_difference([1.0, 2.0], [1.0, 2.0], confidence=1.0)


@pytest.mark.parametrize("x,ref,conf", [([0.1, 0.2, 0.15], 0.05, 0.95), ([1.0, 2.0, 4.0, 3.0], 3.5, 0.9),
                                        ([0.0, 1e-3], 0.0, 0.99)])
def test_shift_interval_matches_scipy_and_closed_form(x, ref, conf):
    d = shift_from(x, ref, conf)
    t = stats.ttest_1samp(x, ref).confidence_interval(conf)  # an interval for mean(x); shift it by ref
    assert d.diff == pytest.approx(np.mean(x) - ref, abs=1e-14) and d.dof == len(x) - 1
    assert (d.low, d.high) == pytest.approx((t.low - ref, t.high - ref), abs=1e-12)
    half = stats.t.ppf((1 + conf) / 2, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
    assert d.high - d.diff == pytest.approx(half, rel=1e-12)


def test_shift_degenerate_and_bad_input():
    d = shift_from([0.25, 0.25, 0.25], 0.2)
    assert (d.low, d.high) == (d.diff, d.diff) and d.diff == pytest.approx(0.05) and d.excludes_zero
    with pytest.raises(ValueError, match=">= 2 values"):
        shift_from([1.0], 0.0)
    with pytest.raises(ValueError, match="confidence"):
        shift_from([1.0, 2.0], 0.0, confidence=0.0)


def test_grpo_table_rows_are_the_statistics_of_the_runs():
    base = {"geneval": 0.1, "drift/mean/k1": 0.3}
    soar = [{"geneval": 0.2, "drift/mean/k1": 0.3}, {"geneval": 0.3, "drift/mean/k1": 0.31}]
    grpo = [{"geneval": 0.4, "drift/mean/k1": 0.3}, {"geneval": 0.5, "drift/mean/k1": 0.35},
            {"geneval": 0.45, "drift/mean/k1": 0.32}]
    text, rows = grpo_table(base, soar, grpo, ["geneval", "drift/mean/k1"], 0.95)
    g = rows[0]
    assert g["grpo_mean"] == pytest.approx(0.45) and g["grpo_minus_base"] == pytest.approx(0.35)
    t = stats.ttest_1samp([0.4, 0.5, 0.45], 0.1).confidence_interval(0.95)
    assert (g["grpo_minus_base_low"], g["grpo_minus_base_high"]) == pytest.approx((t.low - 0.1, t.high - 0.1))
    w = stats.ttest_ind([0.4, 0.5, 0.45], [0.2, 0.3], equal_var=False).confidence_interval(0.95)
    assert (g["grpo_minus_soar_low"], g["grpo_minus_soar_high"]) == pytest.approx((w.low, w.high))
    assert g["verdict_base"] == "GRPO better" and "| geneval | 0.1000 | 0.4500 ± 0.0500 | +0.3500 [" in text
    assert rows[1]["verdict_base"] in ("GRPO worse", "no clear difference")  # drift: lower is better


def test_verdict_direction():
    up, down, zero = Difference(0.1, 0.05, 0.15, 4, 0.95), Difference(-0.1, -0.15, -0.05, 4, .95), \
        Difference(0.1, -0.05, 0.25, 4, .95)
    assert verdict("geneval", up) == "SOAR better" and verdict("geneval", down) == "SOAR worse"
    assert verdict("drift/mean/k1", down) == "SOAR better" and verdict("drift/mean/k1", up) == "SOAR worse"
    assert verdict("ocr", zero) == "no clear difference"
    assert verdict("geneval", up, "GRPO") == "GRPO better" and verdict("drift/mean/k1", up, "GRPO") == "GRPO worse"


def test_main_table_rows_are_the_statistics_of_the_runs():
    base = {"geneval": 0.1, "drift/mean/k1": 0.3}
    sft = [{"geneval": 0.2, "drift/mean/k1": 0.3}, {"geneval": 0.3, "drift/mean/k1": 0.31}]
    soar = [{"geneval": 0.4, "drift/mean/k1": 0.2}, {"geneval": 0.5, "drift/mean/k1": 0.22}]
    text, rows = main_table(base, sft, soar, ["geneval", "drift/mean/k1"], 0.95)
    g = rows[0]
    assert g["sft_mean"] == pytest.approx(0.25) and g["soar_mean"] == pytest.approx(0.45)
    assert g["diff"] == pytest.approx(0.2) and g["low"] < g["diff"] < g["high"]
    assert (g["low"], g["high"]) == pytest.approx(tuple(stats.ttest_ind([0.4, 0.5], [0.2, 0.3], equal_var=False)
                                                        .confidence_interval(0.95)))
    assert "| geneval | 0.1000 | 0.2500 ± 0.0707 | 0.4500 ± 0.0707 |" in text
    assert "SOAR better" in rows[1]["verdict"] or rows[1]["verdict"] == "no clear difference"


def test_headline_metrics_and_drift_parsing():
    m = {"geneval": 1, "ocr": 1, "geneval/colors": 1, "steps10/geneval": 1, "drift/mean/k1": 1, "drift/mean/k5": 1,
         "drift/mean/k10": 1, "drift/s0.90/k2": 0.5, "drift/s0.90/k1": 0.25, "drift/s1.00/k1": 0.1}
    assert headline_metrics(m, 10) == ["geneval", "geneval/colors", "ocr", "drift/mean/k1", "drift/mean/k5",
                                       "drift/mean/k10"]
    assert drift_series(m) == {0.9: {1: 0.25, 2: 0.5}, 1.0: {1: 0.1}}
    table = sweep_table({(0.5, 1): {"g": 0.1}, (0.5, 3): {"g": 0.2}, (2.0, 1): {"g": 0.3}, (2.0, 3): {"g": 0.4}}, "g")
    assert table.splitlines()[2] == "| 0.5 | 0.1000 | 0.2000 |" and table.splitlines()[3] == "| 2.0 | 0.3000 | 0.4000 |"


def test_variants_and_names_follow_the_config():
    cfg = parse_config(read_params(ROOT / "params.yaml"))
    seeds = seed_variants(cfg)
    assert [v.name for v in seeds] == [f"{m}-s{s}" for s in cfg.study.seeds for m in ("sft", "soar", "grpo")]
    assert {v.group for v in seeds} == {"sft", "soar", "grpo"}
    assert all(v.lambda_aux == cfg.soar.lambda_aux for v in seeds if v.method == "soar")
    sweep = sweep_variants(cfg)
    assert len(sweep) == len(cfg.study.lambda_aux) * len(cfg.study.trajectory_length)
    assert sweep[0].name == f"sweep-l{float(cfg.study.lambda_aux[0])}-T{cfg.study.trajectory_length[0]}"
    assert find_variant(cfg, BASE).method == BASE and find_variant(cfg, sweep[-1].name) == sweep[-1]
    with pytest.raises(SystemExit, match="unknown study run 'sft-s99'"):
        find_variant(cfg, "sft-s99")
