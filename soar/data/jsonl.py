"""JSONL reading and writing, and the HY-SOAR training-record format.

Generic helpers (``iter_jsonl``, ``read_jsonl``, ``required_field``) raise ``JsonlError`` naming the
file, the 1-based line number and, where relevant, the key. Blank lines are skipped.

The training format has one JSON object per line with at least::

    {"md5": "<image id>", "caption_en": "<caption>", "bw": <bucket width>, "bh": <bucket height>}

and its image at ``image_dir/{md5}.jpg``. ``read_training_records`` never raises on a bad
line: it returns the good records and a list of ``Problem``s (line number, reason, message)
so the prepare stage can report what it dropped instead of skipping it silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soar import atomic

IMAGE_SUFFIX = ".jpg"
KEY_ID = "md5"
KEY_CAPTION = "caption_en"
KEY_WIDTH = "bw"
KEY_HEIGHT = "bh"
REASON_MALFORMED = "malformed"
REASON_EMPTY_CAPTION = "empty_caption"
_FORBIDDEN_ID_CHARS = ("/", "\\", os.sep)


class JsonlError(ValueError):
    """A JSONL line that cannot be used; the message names ``file:line`` (and the key)."""


@dataclass(frozen=True)
class TrainingRecord:
    """One training example: image id, caption, bucket size (width ``bw``, height ``bh``)."""

    md5: str
    caption: str
    bw: int
    bh: int
    line: int = 0
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def bucket(self) -> tuple[int, int]:
        """``(bw, bh)``: the width and height every image of this bucket is cropped to."""
        return (self.bw, self.bh)

    def image_path(self, image_dir: str | Path) -> Path:
        """``image_dir/{md5}.jpg``."""
        return Path(image_dir) / f"{self.md5}{IMAGE_SUFFIX}"

    def to_json(self) -> dict[str, Any]:
        """The original line's object (extra keys kept), with the four known keys."""
        out = dict(self.raw)
        out.update({KEY_ID: self.md5, KEY_CAPTION: self.caption, KEY_WIDTH: self.bw, KEY_HEIGHT: self.bh})
        return out


@dataclass(frozen=True)
class Problem:
    """Why one line of a training JSONL was not turned into a record."""

    path: str
    line: int
    reason: str  # REASON_MALFORMED or REASON_EMPTY_CAPTION
    message: str
    md5: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; raise ``JsonlError`` on a bad one."""
    for line_no, obj, error in _iter_lines(path):
        if error is not None:
            raise JsonlError(error)
        yield line_no, obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All objects of a JSONL file, in order; a bad line is a ``JsonlError`` naming it."""
    return [obj for _, obj in iter_jsonl(path)]


def required_field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]``, checked to be an instance of ``kind`` (bool never counts as int).

    ``where`` is the location for the message, e.g. ``"train.jsonl:12"``.
    """
    if key not in obj:
        raise JsonlError(f"{where}: missing key {key!r}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise JsonlError(f"{where}: key {key!r} must be {names}, got {type(value).__name__} {value!r}")
    return value


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write one JSON object per line (atomically, via a temporary file); return the count."""
    count = 0
    with atomic.atomic_open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def parse_training_record(obj: Mapping[str, Any], where: str, line: int = 0) -> TrainingRecord:
    """Check one object of the training format; ``JsonlError`` (naming ``where`` and key) if bad.

    An empty or blank caption is not an error here (see ``read_training_records``).
    """
    md5 = required_field(obj, KEY_ID, str, where)
    if not md5 or md5.startswith(".") or any(c in md5 for c in _FORBIDDEN_ID_CHARS):
        raise JsonlError(f"{where}: key {KEY_ID!r} is not a usable file name: {md5!r}")
    caption = required_field(obj, KEY_CAPTION, str, where)
    size = {}
    for key in (KEY_WIDTH, KEY_HEIGHT):
        size[key] = required_field(obj, key, int, where)
        if size[key] <= 0:
            raise JsonlError(f"{where}: key {key!r} must be a positive int, got {size[key]}")
    return TrainingRecord(md5, caption, size[KEY_WIDTH], size[KEY_HEIGHT], line=line, raw=dict(obj))


def read_training_records(path: str | Path) -> tuple[list[TrainingRecord], list[Problem]]:
    """Records of a training JSONL and the ``Problem`` of every line that is not one.

    Problems: ``malformed`` (bad JSON, not an object, missing or ill-typed key, unusable md5,
    non-positive bucket size) and ``empty_caption`` (caption empty or only whitespace).
    A missing file raises ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training JSONL not found: {path}")
    records: list[TrainingRecord] = []
    problems: list[Problem] = []
    for line_no, obj, error in _iter_lines(path):
        where = f"{path}:{line_no}"
        if error is not None:
            problems.append(Problem(str(path), line_no, REASON_MALFORMED, error))
            continue
        try:
            record = parse_training_record(obj, where, line_no)
        except JsonlError as exc:
            md5 = obj.get(KEY_ID) if isinstance(obj.get(KEY_ID), str) else None
            problems.append(Problem(str(path), line_no, REASON_MALFORMED, str(exc), md5))
            continue
        if not record.caption.strip():
            message = f"{where}: key {KEY_CAPTION!r} is empty (md5 {record.md5!r})"
            problems.append(Problem(str(path), line_no, REASON_EMPTY_CAPTION, message, record.md5))
            continue
        records.append(record)
    return records, problems


def _iter_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any], str | None]]:
    """``(line_number, object, None)`` per good line, ``(line_number, {}, message)`` per bad one."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, {}, f"{path}:{line_no}: not UTF-8 ({exc.reason} at byte {exc.start})"
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_no, {}, f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(obj, dict):
                yield line_no, {}, f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}"
                continue
            yield line_no, obj, None


def read_clean_records(path: str | Path) -> list[TrainingRecord]:
    """Records of a training JSONL that must be clean (after prepare): any malformed line is an error."""
    records, problems = read_training_records(path)
    if problems:
        raise ValueError(f"{path}: {len(problems)} malformed line(s), first: {problems[0]}")
    return records
