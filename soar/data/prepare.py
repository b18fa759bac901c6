"""Filter a training JSONL down to usable, good-enough examples and report every drop.

Reasons a line is dropped (each counted, with its first examples, in the report):

- ``malformed``: bad JSON, not an object, missing or ill-typed key, unusable md5/bucket;
- ``empty_caption``: ``caption_en`` empty or blank;
- ``missing_image``: no ``image_dir/{md5}.jpg``;
- ``unreadable_image``: the file exists but does not decode;
- ``low_quality``: ``quality_fn`` score below ``threshold`` (kept when ``score >= threshold``).

A bucket side that is not a multiple of ``bucket_multiple`` (the model's codec factor x patch size,
``soar.models.geometry.pixel_multiple``) is not dropped but stops ``prepare`` with an error naming the
first such line and the count: the dataset was bucketed for another model, and dropping those lines would
silently lose part of it.

Lines whose ``md5`` an earlier line already has (the same image) are kept, the same picture with another
caption being a legitimate pair, and listed in the report (``duplicate_md5``) so that a copy-paste
accident is visible. Images are decoded by ``soar.data.images`` (16-bit, transparency, pixel budget).

``quality_fn`` scores a batch: ``quality_fn(list of uint8 [H, W, 3] RGB arrays) -> float array
[B]`` (the tiny world passes a cheap rule, the paper profile the LAION aesthetic predictor).
Images within one call may differ in size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from soar.data.images import ImageLoadError, load_rgb
from soar.data.jsonl import (
    REASON_EMPTY_CAPTION,
    REASON_MALFORMED,
    TrainingRecord,
    read_training_records,
    write_jsonl,
)
from soar.progress import Progress

QualityFn = Callable[[Sequence[np.ndarray]], np.ndarray]

REASON_MISSING_IMAGE = "missing_image"
REASON_UNREADABLE_IMAGE = "unreadable_image"
REASON_LOW_QUALITY = "low_quality"
REASONS = (
    REASON_MALFORMED,
    REASON_MISSING_IMAGE,
    REASON_UNREADABLE_IMAGE,
    REASON_EMPTY_CAPTION,
    REASON_LOW_QUALITY,
)
MAX_EXAMPLES = 10


class _Report:
    """Counts and first examples per drop reason."""

    def __init__(self) -> None:
        self.counts = {reason: 0 for reason in REASONS}
        self.examples: dict[str, list[dict[str, Any]]] = {reason: [] for reason in REASONS}

    def drop(self, reason: str, line: int, md5: str | None, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append({"line": line, "md5": md5, "message": message})


def _score_batch(quality_fn: QualityFn, images: list[np.ndarray], first_md5: str) -> np.ndarray:
    """Call ``quality_fn`` on one batch and check it returned one finite float per image."""
    scores = np.asarray(quality_fn(images), dtype=np.float64)
    if scores.shape != (len(images),):
        raise ValueError(
            f"quality_fn returned shape {scores.shape} for a batch of {len(images)} images "
            f"(batch starting at md5 {first_md5!r}); expected ({len(images)},)"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"quality_fn returned non-finite scores for the batch starting at md5 {first_md5!r}")
    return scores


def check_buckets(records: Sequence[TrainingRecord], multiple: int, jsonl_path: str | Path) -> None:
    """Raise ``ValueError`` naming the first record whose bucket sides are not multiples of ``multiple`` pixels."""
    bad = [r for r in records if r.bw % multiple or r.bh % multiple]
    if bad:
        r = bad[0]
        raise ValueError(f"{jsonl_path}:{r.line}: bucket {r.bw}x{r.bh} (bw x bh) is not a multiple of {multiple} px, "
                         f"the model's codec factor x patch size ({len(bad)} line(s) like it); re-bucket the "
                         "dataset to multiples of that size")


def prepare_dataset(
    jsonl_path: str | Path,
    image_dir: str | Path,
    out_jsonl: str | Path,
    *,
    quality_fn: QualityFn,
    threshold: float,
    batch_size: int = 64,
    bucket_multiple: int = 1,
) -> dict[str, Any]:
    """Write the kept lines of ``jsonl_path`` (original order and format) to ``out_jsonl``.

    Returns the report: ``input``, ``output``, ``lines`` (non-blank lines read), ``kept``,
    ``dropped`` ({reason: count} for every reason), ``examples`` ({reason: first <= 10
    ``{"line", "md5", "message"}``}), ``duplicate_md5`` (``lines`` repeating an earlier line's md5, kept, and
    the first <= 10 ``{"line", "md5", "first_line"}``), ``quality`` (``threshold``, ``scored``, ``min``, ``mean``,
    ``max`` over all scored images; None stats when none was scored). Raises ``ValueError``
    (with the counts) when nothing is kept; ``out_jsonl`` is then not written.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    jsonl_path, image_dir = Path(jsonl_path), Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image directory not found: {image_dir}")
    records, problems = read_training_records(jsonl_path)
    check_buckets(records, bucket_multiple, jsonl_path)
    report = _Report()
    for problem in problems:
        report.drop(problem.reason, problem.line, problem.md5, str(problem))

    kept: list[TrainingRecord] = []
    all_scores: list[float] = []
    pending: list[tuple[TrainingRecord, np.ndarray]] = []

    def flush() -> None:
        scores = _score_batch(quality_fn, [image for _, image in pending], pending[0][0].md5)
        for (record, _), score in zip(pending, scores, strict=True):
            all_scores.append(float(score))
            if score >= threshold:
                kept.append(record)
            else:
                message = f"{jsonl_path}:{record.line}: quality {score:.4g} < threshold {threshold:g}"
                report.drop(REASON_LOW_QUALITY, record.line, record.md5, message)
        pending.clear()

    progress = Progress("prepare", len(records), unit="image")
    for done, record in enumerate(records):
        progress.update(done, f"{len(kept)} kept")  # the first line comes at once, naming the total
        path = record.image_path(image_dir)
        if not path.is_file():
            where = f"{jsonl_path}:{record.line}"
            report.drop(REASON_MISSING_IMAGE, record.line, record.md5, f"{where}: image not found: {path}")
            continue
        try:
            image = load_rgb(path)
        except ImageLoadError as exc:
            where = f"{jsonl_path}:{record.line}"
            report.drop(REASON_UNREADABLE_IMAGE, record.line, record.md5, f"{where}: {exc}")
            continue
        pending.append((record, image))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    progress.update(len(records), f"{len(kept)} kept")

    lines = len(records) + len(problems)
    first_line: dict[str, int] = {}
    repeats = [{"line": r.line, "md5": r.md5, "first_line": first_line[r.md5]} for r in records
               if first_line.setdefault(r.md5, r.line) != r.line]
    result = {
        "input": str(jsonl_path),
        "output": str(out_jsonl),
        "lines": lines,
        "kept": len(kept),
        "dropped": dict(report.counts),
        "examples": report.examples,
        "duplicate_md5": {"lines": len(repeats), "examples": repeats[:MAX_EXAMPLES]},
        "quality": {
            "threshold": float(threshold),
            "scored": len(all_scores),
            "min": min(all_scores) if all_scores else None,
            "mean": float(np.mean(all_scores)) if all_scores else None,
            "max": max(all_scores) if all_scores else None,
        },
    }
    if not kept:
        raise ValueError(
            f"prepare: no usable record in {jsonl_path} ({lines} lines; dropped {report.counts}; "
            f"images from {image_dir}, threshold {threshold:g})"
        )
    write_jsonl(out_jsonl, (record.to_json() for record in kept))
    return result
