"""Scorers: one interface (``base.Scorer``), one registry (``base.build_scorer``).

The seven built-in scorers, ``geneval``, ``ocr``, ``clipscore``, ``pickscore``, ``aesthetic``, ``hpsv21`` and
``imagereward`` (the modules of ``base.BUILTIN_SCORER_MODULES``), register when the registry is first
used; heavy engines load lazily inside their factories.
"""

from soar.rewards.base import Scorer, ScoreRecord, available, build_scorer, register

__all__ = ["ScoreRecord", "Scorer", "available", "build_scorer", "register"]
