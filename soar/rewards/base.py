"""One interface for every scorer, and the registry that builds them by name.

A scorer takes a batch of images as uint8 RGB arrays ``[N, H, W, 3]`` with one prompt and one
metadata dict per image and returns one ``ScoreRecord`` per image (a float plus optional
details). ``aggregate`` turns the records of one prompt set into the numbers a table reports;
the default is the mean score, scorers with a published aggregation (GenEval) override it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ScoreRecord:
    """The score of one image; ``details`` holds per-image explanations (e.g. failure reason)."""

    score: float
    details: dict[str, Any] = field(default_factory=dict)


class Scorer(ABC):
    """A reward model or rule-based metric, built once and applied to batches."""

    name: str = ""

    @abstractmethod
    def score(
        self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> list[ScoreRecord]:
        """Score ``images`` (uint8 RGB ``[N, H, W, 3]``) given their prompts and metadata."""

    def aggregate(self, records: Sequence[ScoreRecord]) -> dict[str, float]:
        """Numbers for one prompt set; default ``{name: mean score}``."""
        if not records:
            raise ValueError(f"scorer {self.name!r}: no records to aggregate")
        return {self.name: float(np.mean([r.score for r in records]))}


ScorerFactory = Callable[..., Scorer]
_REGISTRY: dict[str, ScorerFactory] = {}
BUILTIN_SCORER_MODULES = (  # imported on first lookup; heavy engines load inside their factories
    "soar.rewards.geneval", "soar.rewards.ocr", "soar.rewards.clip_scores", "soar.rewards.hps",
    "soar.rewards.image_reward",
)


def _load_builtins() -> None:
    """Import the built-in scorer modules so their ``@register`` decorators have run."""
    import importlib

    for module in BUILTIN_SCORER_MODULES:
        importlib.import_module(module)


def register(name: str) -> Callable[[ScorerFactory], ScorerFactory]:
    """Decorator: make ``factory(**options) -> Scorer`` buildable as ``build_scorer(name, ...)``."""

    def wrap(factory: ScorerFactory) -> ScorerFactory:
        if name in _REGISTRY:
            raise ValueError(f"scorer {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    """Names of all registered scorers."""
    _load_builtins()
    return sorted(_REGISTRY)


def build_scorer(name: str, **options: Any) -> Scorer:
    """Build the scorer registered as ``name``; unknown names are an error listing the known ones."""
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown scorer {name!r}; known: {', '.join(available())}")
    return _REGISTRY[name](**options)


def as_uint8_batch(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Stack images into one uint8 RGB array ``[N, H, W, 3]``, checking dtype and channels."""
    batch = np.stack([np.asarray(im) for im in images]) if not isinstance(images, np.ndarray) else images
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images [N, H, W, 3], got {batch.dtype} {tuple(batch.shape)}")
    return batch
