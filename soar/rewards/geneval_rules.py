"""The GenEval rules engine (official evaluator semantics), independent of any detector.

GenEval (Ghosh et al., 2023) decides per image whether the detected objects satisfy the prompt's
metadata line ``{"tag", "include": [...], "exclude"?: [...], "prompt"}``:

* keep detections with confidence ``> 0.3`` (``> 0.9`` for the ``counting`` tag), sorted by
  confidence, at most 16 per class;
* include clauses are AND-ed: the top ``count`` objects of the class must exist; with ``color``, at
  least ``count`` of them must have that colour; with ``position: [relation, j]`` every one of them
  must stand in ``relation`` to every object matched by include clause ``j`` (which must have
  matched);
* exclude clauses are OR-ed: ``count`` or more detections of the class fail the image;
* the overall score is the mean over tags of each tag's fraction of correct images (task average).

"strict" additionally requires exact counts: for every class named by an include clause, the number
of kept detections equals the total count the include clauses ask for.

Colours come from ``Detection.color`` (an exact detector knows them) or from a ``color_of`` callback
(the CLIP zero-shot colour classifier of the real evaluator).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS_PER_CLASS = 16
POSITION_THRESHOLD = 0.1
RELATION_COS = 0.5  # |revised offset| / |offset| beyond which a direction holds
MIN_REVISED_OFFSET = 1e-3
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")

ColorFn = Callable[[list["Detection"]], list[str]]


@dataclass(frozen=True)
class Detection:
    """One detected object: class label, confidence, pixel box ``(x0, y0, x1, y1)``, optional colour."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Relations of box A to box B from their centres, discounting ``0.1 * (dimA + dimB)`` per axis."""
    a = np.asarray(box_a, dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b, dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < MIN_REVISED_OFFSET):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -RELATION_COS:
        relations.add("left of")
    if dx > RELATION_COS:
        relations.add("right of")
    if dy < -RELATION_COS:
        relations.add("above")
    if dy > RELATION_COS:
        relations.add("below")
    return relations


def keep_detections(detections: Sequence[Detection], tag: str) -> dict[str, list[Detection]]:
    """Per class: detections above the tag's threshold, by decreasing confidence, at most 16."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):  # stable: ties keep input order
        if det.score > threshold:
            kept = by_class.setdefault(det.label, [])
            if len(kept) < MAX_OBJECTS_PER_CLASS:
                kept.append(det)
    return by_class


def _colors(found: list[Detection], color_of: ColorFn | None) -> list[str]:
    if color_of is not None:
        colors = list(color_of(found))
        if len(colors) != len(found):
            raise ValueError(f"color_of returned {len(colors)} colours for {len(found)} detections")
        return colors
    missing = [d for d in found if d.color is None]
    if missing:
        raise ValueError(f"detection {missing[0]} has no colour and no color_of callback was given")
    return [str(d.color) for d in found]


def _color_summary(colors: list[str]) -> str:
    order = [c for c in GENEVAL_COLORS if c in colors] + sorted(set(colors) - set(GENEVAL_COLORS))
    counts = Counter(colors)
    return ", ".join(f"{counts[c]} {c}" for c in order)


def evaluate(
    metadata: Mapping[str, Any], detections: Sequence[Detection], *, color_of: ColorFn | None = None
) -> tuple[bool, bool, str]:
    """Judge one image: ``(correct, strict, reason)``; ``reason`` lists failures, one per line."""
    check_metadata(metadata)
    objects = keep_detections(detections, str(metadata["tag"]))
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata["include"]:
        cls, count = req["class"], int(req["count"])
        found = objects.get(cls, [])[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = _colors(found, color_of)
                n_wanted = colors.count(req["color"])
                if n_wanted < count:
                    matched = False
                    reasons.append(
                        f"expected {req['color']} {cls}>={count}, found {n_wanted} {req['color']}; "
                        f"and {_color_summary(colors)}"
                    )
            if "position" in req and matched:
                relation, group = req["position"]
                targets = matched_groups[group]
                target_cls = metadata["include"][group]["class"]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    for obj in found:
                        for target in targets:
                            rels = relative_position(obj.box, target.box)
                            if relation not in rels:
                                matched = False
                                found_rel = " and ".join(sorted(rels)) or "no relation to"
                                reasons.append(
                                    f"expected {cls} {relation} {target_cls}, found {found_rel} {target_cls}"
                                )
                                break
                        if not matched:
                            break
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], int(req["count"])
        n_found = len(objects.get(cls, []))
        if n_found >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {n_found}")
    wanted: Counter[str] = Counter()
    for req in metadata["include"]:
        wanted[req["class"]] += int(req["count"])
    exact = all(len(objects.get(cls, [])) == n for cls, n in wanted.items())
    return correct, correct and exact, "\n".join(reasons)


def aggregate_geneval(
    tags: Sequence[str], corrects: Sequence[bool], stricts: Sequence[bool]
) -> dict[str, float]:
    """Task-averaged GenEval: mean over the tags present of each tag's accuracy, plus per-tag scores."""
    if not (len(tags) == len(corrects) == len(stricts)):
        raise ValueError(f"lengths differ: {len(tags)} tags, {len(corrects)} corrects, {len(stricts)} stricts")
    if not tags:
        raise ValueError("geneval: no images to aggregate")
    per_tag: dict[str, list[tuple[bool, bool]]] = {}
    for tag, ok, strict in zip(tags, corrects, stricts, strict=True):
        per_tag.setdefault(tag, []).append((bool(ok), bool(strict)))
    acc = {t: float(np.mean([c for c, _ in v])) for t, v in per_tag.items()}
    acc_strict = {t: float(np.mean([s for _, s in v])) for t, v in per_tag.items()}
    out = {"geneval": float(np.mean(list(acc.values()))),
           "geneval_strict": float(np.mean(list(acc_strict.values())))}
    out.update({f"geneval/{t}": acc[t] for t in sorted(acc)})
    return out


def check_metadata(metadata: Mapping[str, Any], where: str = "metadata") -> None:
    """Raise ``ValueError`` naming ``where`` and the key when a GenEval metadata line is malformed."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
    for key in ("tag", "include"):
        if key not in metadata:
            raise ValueError(f"{where}: missing key {key!r}")
    includes = metadata["include"]
    if not isinstance(includes, list) or not includes:
        raise ValueError(f"{where}: key 'include' must be a non-empty list")
    for kind in ("include", "exclude"):
        for i, req in enumerate(metadata.get(kind, [])):
            at = f"{where}: {kind}[{i}]"
            if not isinstance(req, Mapping) or "class" not in req or "count" not in req:
                raise ValueError(f"{at} needs keys 'class' and 'count'")
            if not isinstance(req["count"], int) or req["count"] < 1:
                raise ValueError(f"{at}.count must be a positive integer, got {req['count']!r}")
            if "position" in req:
                pos = req["position"]
                ok = isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS
                if not ok or not isinstance(pos[1], int) or not 0 <= pos[1] < i:
                    raise ValueError(f"{at}.position must be [relation, earlier clause index], got {pos!r}")


def load_metadata_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a GenEval metadata JSONL file, validating each line; errors name ``file:line``."""
    path = Path(path)
    lines = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from exc
            check_metadata(obj, where)
            if "prompt" not in obj:
                raise ValueError(f"{where}: missing key 'prompt'")
            lines.append(obj)
    return lines
