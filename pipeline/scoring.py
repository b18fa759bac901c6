"""Building scorers from the ``score`` section: the options every factory shares, and per-scorer ones."""

from __future__ import annotations

from dataclasses import asdict

import torch

from soar.rewards import Scorer, build_scorer

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
    return {"geneval": {"backend": score_cfg.geneval_backend},
            "ocr": {"engine": score_cfg.ocr_engine, "upscale_to": score_cfg.ocr_upscale}}


def build_scorers(score_cfg, names) -> dict[str, Scorer]:
    """Each named scorer, built once with its own options and the common ones."""
    common, options = common_options(score_cfg), scorer_options(score_cfg)
    return {n: build_scorer(n, **options.get(n, {}), **common) for n in names}
