"""The post-training arms: where each starts, how the table and the curves name it."""

from __future__ import annotations

import pytest

from pipeline.arms import METHODS, MODELS, start_model
from pipeline.curves import plot_curves
from pipeline.reference_config import RESERVED_NAMES
from pipeline.report import table_rows


def test_sft_and_soar_start_from_the_base_and_grpo_from_init_from():
    assert [start_model(m, "soar") for m in METHODS] == ["base", "base", "soar"]
    assert start_model("grpo", "base") == "base"
    with pytest.raises(ValueError, match="grpo.init_from"):
        start_model("grpo")
    with pytest.raises(ValueError, match="unknown method 'base'"):
        start_model("base", "base")


def test_table_rows_name_the_grpo_arm_by_its_start():
    rows = table_rows({}, 100, 40, "base")
    assert [(r.model, r.label, r.iterations) for r in rows] == [
        ("base", "base", "–"), ("sft", "+ SFT", "100"), ("soar", "+ SOAR", "100"), ("grpo", "+ GRPO", "40")]
    assert table_rows({}, 1000, 2000, "soar")[-1].label == "+ SOAR + GRPO"
    assert table_rows({}, 1000, 2000, "sft")[-1].iterations == "2k"


def test_reference_models_cannot_take_an_arms_name():
    assert set(MODELS) <= set(RESERVED_NAMES)


def test_curves_figure_has_a_line_per_arm_named_by_the_labels():
    curve = [{"step": 0, "geneval": 0.1}, {"step": 10, "geneval": 0.2}]
    fig = plot_curves({m: curve for m in METHODS}, {"grpo": "+ SOAR + GRPO"})
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["+ SFT", "+ SOAR", "+ SOAR + GRPO"]
