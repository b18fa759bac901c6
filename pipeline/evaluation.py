"""Scoring sampled prompt sets: scorers built from the ``score`` section, per-image records, per-set metrics.

``plan`` is ``score.scorers``: prompt set -> names of the scorers applied to it. A scorer used on one
set reports its metrics under their own names (``pickscore``: the report's columns); a scorer used on
several sets reports ``{set}/{metric}`` for each, so no set's number overwrites another.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline.sample_layout import load_image, read_index
from soar.progress import Progress
from soar.rewards import Scorer, ScoreRecord, build_scorer

Plan = Mapping[str, Sequence[str]]  # prompt set -> scorer names
Records = dict[str, dict[str, list[ScoreRecord]]]  # set -> scorer -> one record per entry, in entry order


def scorer_names(plan: Plan) -> list[str]:
    """Every scorer the plan uses, once, sorted."""
    return sorted({n for names in plan.values() for n in names})


def score_entries(scorers: Mapping[str, Scorer], names: Sequence[str], images: Callable[[int, int], np.ndarray],
                  entries: list[dict], batch_size: int, desc: str) -> dict[str, list[ScoreRecord]]:
    """Apply each named scorer to the images of ``entries``, ``batch_size`` at a time.

    ``images(lo, hi)``: uint8 RGB ``[hi - lo, H, W, 3]`` of ``entries[lo:hi]`` (read from disk, or sampled in memory).
    """
    records: dict[str, list[ScoreRecord]] = {n: [] for n in names}
    progress = Progress(desc, len(entries), unit="image")
    for lo in range(0, len(entries), batch_size):
        batch = entries[lo:lo + batch_size]
        batch_images = images(lo, lo + len(batch))
        for n in names:
            records[n].extend(scorers[n].score(batch_images, [e["prompt"] for e in batch],
                                               [e["metadata"] for e in batch]))
        progress.advance(len(batch))
    return records


def set_metrics(scorers: Mapping[str, Scorer], plan: Plan, records: Records) -> dict[str, float]:
    """Each scorer's aggregate over each of its sets, named as in the module doc."""
    uses = Counter(n for names in plan.values() for n in names)
    metrics: dict[str, float] = {}
    for set_name, names in plan.items():
        for n in names:
            prefix = f"{set_name}/" if uses[n] > 1 else ""
            metrics.update({prefix + k: v for k, v in scorers[n].aggregate(records[set_name][n]).items()})
    return metrics


def score_rows(plan: Plan, entries: Mapping[str, list[dict]], records: Records) -> list[dict]:
    """One ``scores.jsonl`` line per (set, scorer, image)."""
    return [{"set": set_name, "scorer": n, "prompt_index": e["prompt_index"], "image_index": e["image_index"],
             "prompt": e["prompt"], "score": r.score, "details": r.details}
            for set_name, names in plan.items() for n in names
            for e, r in zip(entries[set_name], records[set_name][n], strict=True)]


def score_samples(scorers: Mapping[str, Scorer], plan: Plan, samples_dir: Path, batch_size: int,
                  label: str) -> tuple[dict[str, float], list[dict]]:
    """Score every set of ``plan`` sampled under ``samples_dir/{set}``: ``(metrics, scores.jsonl rows)``."""
    entries, records = {}, {}
    for set_name, names in plan.items():
        set_dir = Path(samples_dir) / set_name
        found = entries[set_name] = read_index(set_dir)
        records[set_name] = score_entries(
            scorers, names, lambda lo, hi, d=set_dir, f=found: np.stack([load_image(d / e["path"]) for e in f[lo:hi]]),
            found, batch_size, f"score {label}/{set_name}")
    return set_metrics(scorers, plan, records), score_rows(plan, entries, records)


def read_records(scores_jsonl: Path, plan: Plan, keep: Mapping[str, Collection[tuple[int, int]]]) -> Records:
    """The records of a ``scores.jsonl`` for the ``(prompt index, image index)`` pairs ``keep`` names per set.

    Every kept pair must be there for each of the set's scorers (else an error naming the file).
    """
    if not scores_jsonl.is_file():
        raise FileNotFoundError(f"scores not found: {scores_jsonl} (run the score stage)")
    records: Records = {s: {n: [] for n in names} for s, names in plan.items()}
    for line in scores_jsonl.read_text().splitlines():
        row = json.loads(line)
        wanted = records.get(row["set"], {}).get(row["scorer"])
        if wanted is not None and (row["prompt_index"], row["image_index"]) in keep[row["set"]]:
            wanted.append(ScoreRecord(row["score"], row["details"]))
    for set_name, by_scorer in records.items():
        for n, found in by_scorer.items():
            if len(found) != len(keep[set_name]):
                raise ValueError(f"{scores_jsonl}: {len(found)} of {len(keep[set_name])} {set_name!r} images scored "
                                 f"by {n!r} (score the same prompt sets again)")
    return records


# Building scorers from the ``score`` section: the options every factory shares, and per-scorer ones.
SCORER_DTYPE = "float32"  # learned scorers run in float32: the published numbers are fp32 evaluations


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def common_options(score_cfg) -> dict:
    """Weights (``score.checkpoints``), download permission, device and dtype: passed to every factory."""
    return dict(checkpoints=asdict(score_cfg.checkpoints), allow_download=score_cfg.allow_download,
                device=resolve_device(score_cfg.device), dtype=SCORER_DTYPE)


def scorer_options(score_cfg) -> dict[str, dict]:
    """Factory options of the scorers that have their own keys in the ``score`` section."""
    return {"geneval": {"backend": score_cfg.geneval_backend, "color_autocast": score_cfg.geneval_color_autocast},
            "ocr": {"engine": score_cfg.ocr_engine, "upscale_to": score_cfg.ocr_upscale}}


def build_scorers(score_cfg, names) -> dict[str, Scorer]:
    """Each named scorer, built once with its own options and the common ones."""
    common, options = common_options(score_cfg), scorer_options(score_cfg)
    return {n: build_scorer(n, **options.get(n, {}), **common) for n in names}
