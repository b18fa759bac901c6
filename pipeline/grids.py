"""Image grids with their prompts written under each image: what the sample and training runs log to MLflow.

A reader browsing a run's artifacts sees what each image was asked to show. Images are scaled to one cell
side (nearest-neighbour upscaling keeps a tiny model's pixels visible; larger images are downscaled with
Lanczos), the prompt is wrapped under its image.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 192  # side of one image in the grid, pixels
COLUMNS = 6  # images per row
CAPTION_LINES = 4  # prompt lines kept under each image (longer prompts end with "…")
FONT_SIZE = 13  # caption font size, pixels
PAD = 8  # gap between cells and around the grid, pixels


@functools.cache
def label_font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size`` pixels (shipped with matplotlib): prompts and labels beyond ASCII ("²", "é", "…")
    draw as letters, where Pillow's built-in font draws boxes."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)


def fit(image: np.ndarray | Image.Image, side: int = CELL) -> Image.Image:
    """``image`` (uint8 ``[H, W, 3]`` or PIL) scaled so its longer side is ``side``, aspect kept."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    scale = side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    method = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return img.convert("RGB").resize(size, method)


def caption_lines(text: str, width: int, lines: int = CAPTION_LINES) -> list[str]:
    """``text`` wrapped to ``width`` characters, at most ``lines`` lines (the last ends with "…" when cut)."""
    wrapped = textwrap.wrap(" ".join(text.split()), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:max(0, width - 1)] + "…"
    return wrapped


def fitting_lines(text: str, font, width_px: int) -> list[str]:
    """``caption_lines`` with the most characters per line whose every line is at most ``width_px`` wide."""
    chars = max(1, int(width_px / max(1.0, font.getlength("abcdefghij") / 10)))
    while True:
        lines = caption_lines(text, chars)
        if chars == 1 or max(font.getlength(line) for line in lines) <= width_px:
            return lines
        chars -= 1


def captioned_grid(images: Sequence[np.ndarray | Image.Image], captions: Sequence[str], *, columns: int = COLUMNS,
                   cell: int = CELL, title: str | None = None) -> Image.Image:
    """One RGB image: ``images`` in rows of ``columns``, each with its caption under it, an optional title on top.

    ``images``: N uint8 ``[H, W, 3]`` arrays or PIL images (any sizes); ``captions``: N strings.
    """
    if len(images) != len(captions):
        raise ValueError(f"captioned_grid: {len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("captioned_grid: no images")
    font = label_font()
    line_h = FONT_SIZE + 3
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    top = PAD + (line_h + PAD if title else 0)
    box_h = cell + 4 + CAPTION_LINES * line_h
    grid = Image.new("RGB", (PAD + cols * (cell + PAD), top + rows * (box_h + PAD)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((PAD, PAD), title, fill="black", font=font)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        r, c = divmod(i, cols)
        x, y = PAD + c * (cell + PAD), top + r * (box_h + PAD)
        tile = fit(image, cell)
        grid.paste(tile, (x + (cell - tile.width) // 2, y + (cell - tile.height) // 2))
        draw.multiline_text((x, y + cell + 4), "\n".join(fitting_lines(caption, font, cell)), fill="black",
                            font=font, spacing=3)
    return grid
