"""The GenEval rules engine on hand-built detections: every tag, every failure reason, thresholds."""

from __future__ import annotations

import pytest

from soar.rewards.geneval_rules import (
    Detection,
    aggregate_geneval,
    check_metadata,
    evaluate,
    load_metadata_jsonl,
    relative_position,
)

TAGS = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
# one line per tag in the official evaluation_metadata.jsonl format (its keys, key order and spacing)
OFFICIAL_FORMAT = """\
{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
{"tag": "two_object", "include": [{"class": "toilet", "count": 1}, {"class": "bicycle", "count": 1}], \
"prompt": "a photo of a toilet and a bicycle"}
{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], \
"prompt": "a photo of two clocks"}
{"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "purple"}], "prompt": "a photo of a purple cow"}
{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, \
{"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}
{"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"}, \
{"class": "microwave", "count": 1, "color": "purple"}], "prompt": "a photo of a green bus and a purple microwave"}
"""


def det(label: str, x: float = 0.0, y: float = 0.0, *, size: float = 10.0, score: float = 0.95,
        color: str | None = "red") -> Detection:
    return Detection(label, score, (x, y, x + size, y + size), color)


def meta(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    out = {"tag": tag, "include": include, "prompt": "p"}
    if exclude:
        out["exclude"] = exclude
    return out


SINGLE = meta("single_object", [{"class": "circle", "count": 1}])
TWO = meta("two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}])
COUNT2 = meta("counting", [{"class": "circle", "count": 2}], [{"class": "circle", "count": 3}])
RED_CIRCLE = meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
LEFT_OF = meta("position", [{"class": "square", "count": 1},
                            {"class": "circle", "count": 1, "position": ["left of", 0]}])
ATTR = meta("color_attr", [{"class": "circle", "count": 1, "color": "red"},
                           {"class": "square", "count": 1, "color": "blue"}])


def test_single_object_pass_fail_and_threshold():
    assert evaluate(SINGLE, [det("circle")]) == (True, True, "")
    assert evaluate(SINGLE, []) == (False, False, "expected circle>=1, found 0")
    assert evaluate(SINGLE, [det("square")])[2] == "expected circle>=1, found 0"
    assert not evaluate(SINGLE, [det("circle", score=0.3)])[0]  # strictly above 0.3
    assert evaluate(SINGLE, [det("circle", score=0.31)])[0]


def test_strict_needs_exact_counts():
    correct, strict, _ = evaluate(SINGLE, [det("circle"), det("circle", 30)])
    assert correct and not strict
    assert evaluate(SINGLE, [det("circle"), det("square", 30)])[1]  # other classes do not matter


def test_two_object_is_an_and():
    assert evaluate(TWO, [det("circle"), det("square", 30)])[0]
    correct, _, reason = evaluate(TWO, [det("circle")])
    assert not correct and reason == "expected square>=1, found 0"
    correct, _, reason = evaluate(TWO, [])
    assert reason == "expected circle>=1, found 0\nexpected square>=1, found 0"


def test_counting_threshold_and_exclude():
    two = [det("circle", 0), det("circle", 20)]
    assert evaluate(COUNT2, two) == (True, True, "")
    three = two + [det("circle", 40)]
    assert evaluate(COUNT2, three) == (False, False, "expected circle<3, found 3")
    # a third circle at 0.85 counts for every tag but counting (threshold 0.9)
    unsure = two + [det("circle", 40, score=0.85)]
    assert evaluate(COUNT2, unsure) == (True, True, "")
    as_single = {**COUNT2, "tag": "single_object"}
    assert evaluate(as_single, unsure)[2] == "expected circle<3, found 3"
    weak = [det("circle", 0), det("circle", 20, score=0.85)]
    assert evaluate(COUNT2, weak)[2] == "expected circle>=2, found 1"


def test_exclude_clauses_are_an_or():
    m = meta("counting", [{"class": "circle", "count": 1}],
             [{"class": "square", "count": 1}, {"class": "triangle", "count": 2}])
    assert evaluate(m, [det("circle"), det("triangle", 20)])[0]
    correct, _, reason = evaluate(m, [det("circle"), det("square", 20)])
    assert not correct and reason == "expected square<1, found 1"


def test_at_most_16_per_class_by_confidence():
    many = [det("circle", 12 * i, score=0.5 + 0.01 * i) for i in range(20)]
    m16 = meta("counting", [{"class": "circle", "count": 1}], [{"class": "circle", "count": 17}])
    assert evaluate({**m16, "tag": "two_object"}, many)[0]  # 20 detected, only 16 kept
    m17 = meta("two_object", [{"class": "circle", "count": 17}])
    assert evaluate(m17, many)[2] == "expected circle>=17, found 16"


def test_colors_and_reason():
    assert evaluate(RED_CIRCLE, [det("circle", color="red")])[0]
    correct, _, reason = evaluate(RED_CIRCLE, [det("circle", color="blue")])
    assert not correct and reason == "expected red circle>=1, found 0 red; and 1 blue"
    # only the top-`count` objects are colour-checked: the most confident circle is blue
    dets = [det("circle", 20, color="red", score=0.5), det("circle", 0, color="blue", score=0.99)]
    assert not evaluate(RED_CIRCLE, dets)[0]
    m2 = meta("colors", [{"class": "circle", "count": 2, "color": "red"}])
    dets = [det("circle", 0, color="red"), det("circle", 20, color="blue"), det("circle", 40, color="red", score=0.4)]
    assert evaluate(m2, dets)[2] == "expected red circle>=2, found 1 red; and 1 red, 1 blue"


def test_color_callback_overrides_and_missing_colour_is_an_error():
    seen = []

    def clip_colors(found):
        seen.append(len(found))
        return ["red"] * len(found)

    assert evaluate(RED_CIRCLE, [det("circle", color="blue")], color_of=clip_colors)[0]
    assert seen == [1]
    with pytest.raises(ValueError, match="no colour"):
        evaluate(RED_CIRCLE, [det("circle", color=None)])


def test_relative_position_revised_offset():
    a = (0.0, 0.0, 10.0, 10.0)
    assert relative_position(a, (12.0, 0.0, 22.0, 10.0)) == {"left of"}  # dx = -(12-2)/12
    assert relative_position((12.0, 0.0, 22.0, 10.0), a) == {"right of"}
    # raw offset says "left of" but 0.1*(dimA+dimB) = 2 eats most of it: dx = -(3-2)/3
    assert relative_position(a, (3.0, 0.0, 13.0, 10.0)) == set()
    assert relative_position(a, (10.0, 10.0, 20.0, 20.0)) == {"left of", "above"}  # -(10-2)/14.1 each
    assert relative_position((0.0, 30.0, 10.0, 40.0), a) == {"below"}
    assert relative_position(a, a) == set()


def test_position_pass_fail_and_missing_target():
    square = det("square", 30, 0)
    assert evaluate(LEFT_OF, [square, det("circle", 0, 0)]) == (True, True, "")
    correct, _, reason = evaluate(LEFT_OF, [square, det("circle", 60, 0)])
    assert not correct and reason == "expected circle left of square, found right of square"
    assert evaluate(LEFT_OF, [square, det("circle", 33, 0)])[2] == (
        "expected circle left of square, found no relation to square")
    correct, _, reason = evaluate(LEFT_OF, [det("circle", 0, 0)])
    assert reason == "expected square>=1, found 0\nno target for circle to be left of"


def test_color_attr():
    ok = [det("circle", 0, color="red"), det("square", 30, color="blue")]
    assert evaluate(ATTR, ok)[0]
    swapped = [det("circle", 0, color="blue"), det("square", 30, color="red")]
    correct, _, reason = evaluate(ATTR, swapped)
    assert not correct
    assert reason == ("expected red circle>=1, found 0 red; and 1 blue\n"
                      "expected blue square>=1, found 0 blue; and 1 red")


def test_task_average_differs_from_image_mean():
    tags = ["single_object"] * 3 + ["counting"]
    corrects = [True, True, True, False]
    stricts = [True, False, True, False]
    out = aggregate_geneval(tags, corrects, stricts)
    assert out["geneval"] == pytest.approx(0.5)  # (1 + 0) / 2, while the image mean is 0.75
    assert out["geneval_strict"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["geneval/single_object"] == 1.0 and out["geneval/counting"] == 0.0
    assert set(out) == {"geneval", "geneval_strict", "geneval/single_object", "geneval/counting"}
    with pytest.raises(ValueError, match="lengths differ"):
        aggregate_geneval(tags, corrects[:2], stricts)


def test_metadata_errors_name_the_key_and_line(tmp_path):
    with pytest.raises(ValueError, match="missing key 'include'"):
        check_metadata({"tag": "colors"})
    with pytest.raises(ValueError, match=r"include\[0\]\.count"):
        check_metadata({"tag": "colors", "include": [{"class": "circle", "count": 0}]})
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"tag": "colors", "include": [{"class": "c", "count": 1}], "prompt": "p"}\n{oops\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: invalid JSON"):
        load_metadata_jsonl(bad)


def test_official_format_parses(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text(OFFICIAL_FORMAT + "\n")  # a trailing blank line is skipped
    lines = load_metadata_jsonl(path)
    assert [m["tag"] for m in lines] == ["single_object", "two_object", "counting", "colors", "position",
                                         "color_attr"]
    assert lines[2]["exclude"] == [{"class": "clock", "count": 3}]
    assert lines[4]["include"][1]["position"] == ["right of", 0]
    for m in lines:  # every tag's clauses go through the rules engine
        assert evaluate(m, [])[:2] == (False, False)


@pytest.mark.public_data
def test_official_prompt_list_parses(public_prompt_files):
    lines = load_metadata_jsonl(public_prompt_files / "geneval" / "evaluation_metadata.jsonl")
    assert len(lines) == 553
    assert {m["tag"] for m in lines} == TAGS
