"""OCR reward, Flow-GRPO protocol.

For each image and its prompt:

1. target = the text between the first pair of double quotes in the prompt
   (``'a sign that says "Open Late"'`` -> ``Open Late``);
2. recognised = every text line the OCR engine detects, joined in reading order;
3. both are lower-cased and stripped of spaces (``" "``, as the reference does);
4. distance = 0 if the target is a substring of the recognised text, otherwise the
   Levenshtein distance between them, capped at ``len(target)``;
5. reward = 1 - distance / len(target), in [0, 1].

Choices made here, where the reference is silent or unsafe:

- A prompt with no double-quoted target (or an empty one) is a ``ValueError`` naming the
  prompt. The reference would crash on ``split('"')[1]`` or divide by zero; an OCR prompt
  set without targets is a configuration mistake we want to see, not a silent score.
- An exception from the OCR engine propagates (the reference turns it into reward 0 and
  prints a line, which hides broken installs behind a plausible number).
- Images are passed to the engine in BGR order, which both rapidocr and PaddleOCR expect
  for ndarray input (the reference passed RGB; on our rendered test strings the result is
  the same either way).
- ``upscale_to``: images whose shorter side is below this many pixels are first enlarged
  with PIL bicubic resampling so the shorter side equals it. The tiny world renders 64x64
  images; the detector and recogniser were trained on much larger text. 512x512 paper
  images are never touched (default 256).
- Detector resizing follows PaddleOCR's defaults (``det_limit_type="max"``, 960): an image
  whose longer side is at most 960 px is detected at its own size. rapidocr's own default
  (shorter side forced up to 736) would process 512x512 images differently from the
  reference and costs about 5x more time per image.

Engines: ``rapidocr`` (default; rapidocr-onnxruntime ships the PP-OCRv4 det/rec ONNX weights
in its wheel and runs offline on CPU) and ``paddle`` (the reference PaddleOCR 2.x engine,
optional extra ``paddleocr``). Both are imported lazily inside the factory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from soar.rewards.base import Scorer, ScoreRecord, as_uint8_batch, register

QUOTE = '"'
DEFAULT_UPSCALE_TO = 256
# PaddleOCR 2.x defaults, used by the Flow-GRPO reference scorer.
REFERENCE_DET_LIMIT_SIDE_LEN = 960
REFERENCE_DET_LIMIT_TYPE = "max"
REFERENCE_TEXT_SCORE = 0.5
ENGINES = ("rapidocr", "paddle")

# Reads the text lines of one uint8 RGB image [H, W, 3], in reading order.
LineReader = Callable[[np.ndarray], list[str]]


# ----------------------------------------------------------------------------- pure functions


def extract_target(prompt: str) -> str:
    """The text between the first pair of double quotes in ``prompt`` (not normalised).

    Raises ``ValueError`` naming the prompt when there is no closing quote pair or the quoted
    text is empty after removing spaces.
    """
    parts = prompt.split(QUOTE)
    if len(parts) < 3:
        raise ValueError(f"OCR prompt has no double-quoted target text: {prompt!r}")
    target = parts[1]
    if not normalize_text(target):
        raise ValueError(f"OCR prompt has an empty double-quoted target text: {prompt!r}")
    return target


def normalize_text(text: str) -> str:
    """Lower-case and remove spaces, as the reference protocol compares texts."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_distance(target: str, recognised: str) -> int:
    """Protocol distance: 0 if the normalised target occurs in the normalised recognised text,
    else their Levenshtein distance capped at the normalised target's length."""
    t, r = normalize_text(target), normalize_text(recognised)
    if not t:
        raise ValueError(f"OCR target {target!r} is empty after removing spaces")
    if t in r:
        return 0
    return min(levenshtein(r, t), len(t))


def ocr_reward(target: str, recognised: str) -> float:
    """Reward in [0, 1]: ``1 - ocr_distance(target, recognised) / len(normalised target)``."""
    return 1.0 - ocr_distance(target, recognised) / len(normalize_text(target))


def upscale(image: np.ndarray, upscale_to: int) -> np.ndarray:
    """Enlarge a uint8 RGB image [H, W, 3] (bicubic) so its shorter side is ``upscale_to``.

    Images whose shorter side already reaches ``upscale_to`` (or ``upscale_to <= 0``) are
    returned unchanged. Output: uint8 [H', W', 3] with the aspect ratio kept.
    """
    height, width = image.shape[:2]
    shorter = min(height, width)
    if upscale_to <= 0 or shorter >= upscale_to:
        return image
    factor = upscale_to / shorter
    size = (max(round(width * factor), 1), max(round(height * factor), 1))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


# ----------------------------------------------------------------------------- scorer


class OcrScorer(Scorer):
    """Flow-GRPO OCR reward over a line reader (see the module docstring for the protocol)."""

    name = "ocr"

    def __init__(self, read_lines: LineReader, upscale_to: int = DEFAULT_UPSCALE_TO):
        self.read_lines = read_lines
        self.upscale_to = int(upscale_to)

    def recognise(self, image: np.ndarray) -> str:
        """All text lines read in one uint8 RGB image [H, W, 3], joined without separator."""
        return "".join(self.read_lines(upscale(image, self.upscale_to)))

    def score(
        self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> list[ScoreRecord]:
        """One record per image (uint8 RGB [N, H, W, 3]); details: target, recognised, distance."""
        batch = as_uint8_batch(images)
        if len(batch) != len(prompts):
            raise ValueError(f"OCR scorer got {len(batch)} images but {len(prompts)} prompts")
        targets = [extract_target(p) for p in prompts]  # fail before spending time on OCR
        records = []
        for image, target in zip(batch, targets, strict=True):
            recognised = self.recognise(image)
            distance = ocr_distance(target, recognised)
            reward = 1.0 - distance / len(normalize_text(target))
            details = {"target": target, "recognised": recognised, "distance": distance}
            records.append(ScoreRecord(score=reward, details=details))
        return records


def _rapidocr_reader(det_limit_side_len: int, det_limit_type: str, text_score: float) -> LineReader:
    """Line reader over rapidocr-onnxruntime (PP-OCRv4 det + rec, no angle classifier)."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("the OCR reward needs `rapidocr-onnxruntime` (pip install -e .)") from exc
    engine = RapidOCR(
        det_limit_side_len=det_limit_side_len, det_limit_type=det_limit_type, text_score=text_score
    )

    def read(image: np.ndarray) -> list[str]:
        bgr = np.ascontiguousarray(image[..., ::-1])
        result, _ = engine(bgr, use_cls=False)
        return [str(line[1]) for line in result] if result else []

    return read


def _paddle_reader(det_limit_side_len: int, det_limit_type: str, text_score: float) -> LineReader:
    """Line reader over PaddleOCR 2.x (``PaddleOCR(lang="en", use_angle_cls=False)``)."""
    try:
        from paddleocr import PaddleOCR
    except ImportError as exc:
        raise ImportError(
            "OCR engine 'paddle' needs the optional `paddleocr` extra (PaddleOCR 2.x and paddlepaddle), "
            "which is not installed; install it or use engine='rapidocr'"
        ) from exc
    engine = PaddleOCR(
        use_angle_cls=False,
        lang="en",
        show_log=False,
        det_limit_side_len=det_limit_side_len,
        det_limit_type=det_limit_type,
        drop_score=text_score,
    )

    def read(image: np.ndarray) -> list[str]:
        result = engine.ocr(np.ascontiguousarray(image[..., ::-1]), cls=False)
        lines = result[0] if result else None
        return [str(line[1][0]) for line in lines] if lines else []

    return read


@register("ocr")
def build_ocr_scorer(
    engine: str = "rapidocr",
    upscale_to: int = DEFAULT_UPSCALE_TO,
    det_limit_side_len: int = REFERENCE_DET_LIMIT_SIDE_LEN,
    det_limit_type: str = REFERENCE_DET_LIMIT_TYPE,
    text_score: float = REFERENCE_TEXT_SCORE,
    *,
    checkpoints: Mapping[str, str | None] | None = None,
    allow_download: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
) -> OcrScorer:
    """Build the OCR scorer; the engine is loaded once, here.

    ``checkpoints``, ``allow_download``, ``device``, ``dtype``: the options every scorer factory takes;
    unused here (both engines ship their PP-OCRv4 weights in their packages and run on the CPU).
    """
    readers = {"rapidocr": _rapidocr_reader, "paddle": _paddle_reader}
    if engine not in readers:
        raise ValueError(f"unknown OCR engine {engine!r}; known: {', '.join(ENGINES)}")
    if det_limit_type not in ("max", "min"):
        raise ValueError(f"det_limit_type must be 'max' or 'min', got {det_limit_type!r}")
    reader = readers[engine](int(det_limit_side_len), det_limit_type, float(text_score))
    return OcrScorer(reader, upscale_to=upscale_to)
