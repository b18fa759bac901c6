"""Scorers: one interface (``base.Scorer``), one registry (``base.build_scorer``).

Importing this package registers every scorer; heavy engines load lazily inside the factories.
"""

from soar.rewards import geneval, ocr  # noqa: F401  (registration)
from soar.rewards.base import Scorer, ScoreRecord, available, build_scorer, register

__all__ = ["ScoreRecord", "Scorer", "available", "build_scorer", "register"]
