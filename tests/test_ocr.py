"""OCR reward: protocol arithmetic by hand, and the shipped rapidocr model on rendered text."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from soar.rewards.base import build_scorer
from soar.rewards.ocr import (
    OcrScorer,
    extract_target,
    levenshtein,
    ocr_distance,
    ocr_reward,
    upscale,
)

BLACK, WHITE = (0, 0, 0), (255, 255, 255)


def render(lines: list[str], size: tuple[int, int], font_size: int, fg=BLACK, bg=WHITE) -> np.ndarray:
    """uint8 RGB [H, W, 3] (size = (W, H)) with the lines centred one under the other."""
    image = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
    gap = font_size // 3
    total = sum(b[3] - b[1] for b in boxes) + gap * (len(lines) - 1)
    y = (size[1] - total) / 2
    for line, (left, top, right, bottom) in zip(lines, boxes, strict=True):
        draw.text(((size[0] - (right - left)) / 2 - left, y - top), line, fill=fg, font=font)
        y += bottom - top + gap
    return np.asarray(image)


# ----------------------------------------------------------------------------- pure functions


def test_extract_target_takes_first_quoted_pair():
    assert extract_target('a sign saying "Open Late" and "other"') == "Open Late"
    assert extract_target('"CAT"') == "CAT"


@pytest.mark.parametrize("prompt", ["a cat on a mat", 'one "quote only', 'empty "" target', 'blank " " one'])
def test_extract_target_without_usable_quotes_names_the_prompt(prompt):
    with pytest.raises(ValueError, match="OCR prompt") as info:
        extract_target(prompt)
    assert repr(prompt) in str(info.value)


def test_levenshtein_hand_cases():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_reward_substring_is_perfect():
    assert ocr_distance("cat", "THECATSAT") == 0
    assert ocr_reward("cat", "the cat sat") == 1.0


def test_reward_normalises_case_and_spaces():
    assert ocr_reward("Open Late", "OPENLATE") == 1.0
    assert ocr_reward("openlate", "Open  Late") == 1.0


def test_reward_levenshtein_fraction():
    # "hello" vs "hallo": one substitution -> 1 - 1/5
    assert ocr_distance("hello", "hallo") == 1
    assert ocr_reward("hello", "hallo") == pytest.approx(0.8)
    # "world" vs "wrld": one deletion -> 1 - 1/5
    assert ocr_reward("World", "wrld") == pytest.approx(0.8)


def test_reward_distance_is_capped_at_target_length():
    # Levenshtein("abcdefghij", "xy") = 10 > len("xy") = 2 -> capped at 2 -> reward 0
    assert levenshtein("abcdefghij", "xy") == 10
    assert ocr_distance("xy", "abcdefghij") == 2
    assert ocr_reward("xy", "abcdefghij") == 0.0


def test_reward_empty_recognised_is_zero():
    assert ocr_distance("cat", "") == 3
    assert ocr_reward("cat", "") == 0.0


def test_upscale_only_small_images_keeps_aspect():
    small = np.zeros((64, 32, 3), np.uint8)
    assert upscale(small, 256).shape == (512, 256, 3)
    big = np.zeros((512, 512, 3), np.uint8)
    assert upscale(big, 256) is big
    assert upscale(small, 0) is small


# ----------------------------------------------------------------------------- scorer plumbing


def test_scorer_details_and_prompt_check_with_fake_reader():
    seen = []

    def reader(image):
        seen.append(image.shape)
        return ["THE CAT", "SAT"]

    scorer = OcrScorer(reader, upscale_to=128)
    images = np.zeros((2, 64, 64, 3), np.uint8)
    records = scorer.score(images, ['a "cat sat"', 'a "dog"'], [{}, {}])
    assert seen == [(128, 128, 3), (128, 128, 3)]
    assert records[0].score == 1.0
    assert records[0].details == {"target": "cat sat", "recognised": "THE CATSAT", "distance": 0}
    assert records[1].details["distance"] == 3 and records[1].score == 0.0
    with pytest.raises(ValueError, match="no double-quoted"):
        scorer.score(images, ['a "cat"', "no target here"], [{}, {}])
    assert len(seen) == 2  # the bad prompt is caught before any OCR runs


def test_rapidocr_reader_feeds_bgr(monkeypatch):
    received = {}

    class FakeRapidOCR:
        def __init__(self, **kwargs):
            received["kwargs"] = kwargs

        def __call__(self, image, use_cls=True):
            received["image"], received["use_cls"] = image, use_cls
            return [[[[0, 0]] * 4, "RED", 0.99]], [0.0]

    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", types.SimpleNamespace(RapidOCR=FakeRapidOCR))
    scorer = build_scorer("ocr", upscale_to=0)
    image = np.zeros((1, 8, 8, 3), np.uint8)
    image[..., 0] = 200  # pure red in RGB
    [record] = scorer.score(image, ['"red"'], [{}])
    assert record.score == 1.0
    assert received["image"][0, 0].tolist() == [0, 0, 200]  # blue-green-red
    assert received["use_cls"] is False  # reference: use_angle_cls=False, cls=False
    assert received["kwargs"]["det_limit_type"] == "max"


def test_unknown_engine_and_missing_paddle_are_clear():
    with pytest.raises(ValueError, match="unknown OCR engine"):
        build_scorer("ocr", engine="tesseract")
    try:
        import paddleocr  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="paddleocr"):
            build_scorer("ocr", engine="paddle")
    else:
        pytest.skip("paddleocr is installed")


# ----------------------------------------------------------------------------- the real engine


@pytest.fixture(scope="module")
def rapid():
    return build_scorer("ocr")


READABLE = [
    # (lines, (W, H), font size, fg, bg)
    (["CAT"], (64, 64), 20, BLACK, WHITE),
    (["sun"], (64, 64), 14, BLACK, WHITE),
    (["GO"], (64, 64), 20, (255, 255, 0), (0, 0, 128)),
    (["HELLO"], (128, 128), 24, BLACK, WHITE),
    (["Hello World"], (256, 256), 28, (200, 30, 30), (240, 240, 240)),
    (["OPEN", "LATE"], (256, 256), 40, BLACK, WHITE),
    (["SOAR 2025"], (512, 512), 60, BLACK, WHITE),
]


@pytest.mark.parametrize("lines,size,font_size,fg,bg", READABLE, ids=["-".join(c[0]) for c in READABLE])
def test_rapidocr_reads_rendered_text(rapid, lines, size, font_size, fg, bg):
    image = render(lines, size, font_size, fg, bg)
    prompt = f'a picture with the text "{" ".join(lines)}" on it'
    [record] = rapid.score(image[None], [prompt], [{}])
    assert record.score == 1.0, record.details
    assert record.details["distance"] == 0


def test_rapidocr_blank_image_scores_zero(rapid):
    image = np.full((1, 64, 64, 3), 255, np.uint8)
    [record] = rapid.score(image, ['"cat"'], [{}])
    assert record.details["recognised"] == ""
    assert record.score == 0.0


def test_rapidocr_wrong_word_gets_partial_credit(rapid):
    image = render(["CAT"], (64, 64), 20)
    [record] = rapid.score(image[None], ['"cap"'], [{}])
    assert record.details["recognised"].lower() == "cat"
    assert record.score == pytest.approx(1 - 1 / 3)
