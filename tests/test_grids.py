"""Captioned grids (the sample and validation images MLflow shows): every image in its cell, its prompt under it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from pipeline.grids import CAPTION_LINES, FONT_SIZE, PAD, caption_lines, captioned_grid, fit


def solid(value: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def test_each_image_fills_its_cell_and_its_caption_is_drawn_under_it():
    images = [solid(v) for v in (10, 60, 110, 160, 210)]
    grid = np.asarray(captioned_grid(images, [f"prompt {i}" for i in range(5)], columns=3, cell=32))
    line_h = FONT_SIZE + 3
    box_h = 32 + 4 + CAPTION_LINES * line_h
    assert grid.shape == (PAD + 2 * (box_h + PAD), PAD + 3 * (32 + PAD), 3)
    for i, v in enumerate((10, 60, 110, 160, 210)):
        r, c = divmod(i, 3)
        x, y = PAD + c * (32 + PAD), PAD + r * (box_h + PAD)
        assert (grid[y:y + 32, x:x + 32] == v).all(), i  # 8 px upscaled to the 32 px cell
        caption = grid[y + 32 + 4:y + box_h, x:x + 32 + PAD // 2]
        assert (caption < 128).any(), f"no text under image {i}"
    x, y = PAD + 2 * (32 + PAD), PAD + (box_h + PAD)  # the empty sixth cell stays white
    assert (grid[y:y + box_h, x:x + 32] == 255).all()


def test_a_title_moves_the_cells_down():
    plain = np.asarray(captioned_grid([solid(0)], ["p"], cell=16))
    titled = np.asarray(captioned_grid([solid(0)], ["p"], cell=16, title="geneval"))
    assert titled.shape[0] == plain.shape[0] + FONT_SIZE + 3 + PAD
    assert (titled[PAD:PAD + FONT_SIZE] < 128).any()


def test_fit_keeps_the_aspect_and_upscales_by_nearest_neighbour():
    wide = np.zeros((4, 8, 3), np.uint8)
    wide[:, 4:] = 200
    out = np.asarray(fit(wide, 32))
    assert out.shape == (16, 32, 3) and set(np.unique(out)) == {0, 200}
    assert fit(Image.new("RGB", (1024, 512)), 32).size == (32, 16)


def test_long_prompts_are_cut_with_an_ellipsis():
    lines = caption_lines("word " * 100, width=20, lines=3)
    assert len(lines) == 3 and lines[-1].endswith("…") and all(len(s) <= 20 for s in lines)
    assert caption_lines("a  red\ncircle", 20) == ["a red circle"]


def test_images_and_captions_must_pair_up():
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        captioned_grid([solid(0), solid(1)], ["one"])
    with pytest.raises(ValueError, match="no images"):
        captioned_grid([], [])


def test_labels_beyond_ascii_draw_as_letters():
    """"SD-XL (1024²)" and accented prompts: the label font has the glyphs (not the missing-glyph box)."""
    from pipeline.grids import label_font

    def ink(font, char: str) -> np.ndarray:
        return np.array(font.getmask(char), dtype=np.uint8).reshape(font.getmask(char).size[::-1])

    box = "\U000f0000"  # a private-use code point: any font's missing-glyph box
    builtin = ImageFont.load_default(size=13)
    assert np.array_equal(ink(builtin, "²"), ink(builtin, box))  # what the grids drew before: a box
    for char in "²é…":
        assert not np.array_equal(ink(label_font(), char), ink(label_font(), box)), char
