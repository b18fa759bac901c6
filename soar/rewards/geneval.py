"""The GenEval scorer: a detector backend plus the official rules engine (``geneval_rules``).

Backends:

* ``tiny`` — the exact tiny-world detector (``tiny_detector``), colours from the palette; for the
  embedded default profile.
* ``mask2former`` — the published evaluator (Mask2Former Swin-S COCO + CLIP ViT-L-14 colour
  classifier, ``geneval_m2f``) for the paper profile; weights from ``score.checkpoints.mask2former``
  and ``score.checkpoints.clip_vit_l14``.

Each image's score is 1.0 when the rules engine marks it correct, else 0.0; ``aggregate`` reports the
official task-averaged score (``geneval``), its strict variant and per-tag accuracies.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from soar.rewards.base import Scorer, ScoreRecord, as_uint8_batch, register
from soar.rewards.geneval_rules import Detection, aggregate_geneval, check_metadata, evaluate
from soar.rewards.tiny_detector import TinyDetector

BACKENDS = ("tiny", "mask2former")


class GenEvalBase(Scorer):
    """GenEval correctness per image: a backend's ``detect`` plus the shared rules engine."""

    name = "geneval"

    @abstractmethod
    def detect(self, images: np.ndarray, metadata: Sequence[Mapping[str, Any]]) -> list[list[Detection]]:
        """Detections per image of a uint8 RGB batch ``[N, H, W, 3]``; every detection that a colour
        clause of the image's (validated) metadata will inspect carries its ``color``."""

    def score(
        self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> list[ScoreRecord]:
        """One record per image: score 1.0/0.0, details ``{"tag", "strict", "reason"}``."""
        batch = as_uint8_batch(images)
        if not (len(batch) == len(prompts) == len(metadata)):
            raise ValueError(f"geneval: {len(batch)} images, {len(prompts)} prompts, {len(metadata)} metadata")
        for i, (prompt, meta) in enumerate(zip(prompts, metadata, strict=True)):
            check_metadata(meta, where=f"geneval: metadata of image {i} (prompt {prompt!r})")
            if "prompt" in meta and str(meta["prompt"]).strip() != str(prompt).strip():
                raise ValueError(f"geneval: image {i}: prompt {prompt!r} differs from its metadata's "
                                 f"prompt {meta['prompt']!r}")
        records = []
        for meta, detections in zip(metadata, self.detect(batch, metadata), strict=True):
            correct, strict, reason = evaluate(meta, detections)
            records.append(ScoreRecord(float(correct), {"tag": str(meta["tag"]), "strict": strict, "reason": reason}))
        return records

    def aggregate(self, records: Sequence[ScoreRecord]) -> dict[str, float]:
        """``geneval`` (mean over tags of per-tag accuracy), ``geneval_strict``, ``geneval/<tag>``."""
        if not records:
            raise ValueError("geneval: no records to aggregate")
        for i, r in enumerate(records):
            if "tag" not in r.details or "strict" not in r.details:
                raise ValueError(f"geneval: record {i} lacks details 'tag'/'strict' (not a GenEval record?)")
        return aggregate_geneval([r.details["tag"] for r in records], [r.score > 0.5 for r in records],
                                 [bool(r.details["strict"]) for r in records])


class GenEvalScorer(GenEvalBase):
    """GenEval correctness per image with the tiny-world detector.

    ``image_size`` is the side the tiny world was rendered at; images of another size are resized to
    it (box filter) before detection, so object sizes match what the detector expects.
    """

    def __init__(self, image_size: int = 64) -> None:
        if image_size < 16:
            raise ValueError(f"geneval: image_size must be >= 16, got {image_size}")
        self.image_size = image_size
        self.detector = TinyDetector(image_size)

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        if image.shape[:2] == (self.image_size, self.image_size):
            return image
        side = (self.image_size, self.image_size)
        return np.asarray(Image.fromarray(image).resize(side, Image.Resampling.BOX))

    def detect(self, images: np.ndarray, metadata: Sequence[Mapping[str, Any]]) -> list[list[Detection]]:
        """Exact tiny-world detections (with palette colours), one image at a time."""
        return [self.detector.detect(self._prepare(image)) for image in images]


@register("geneval")
def build_geneval(backend: str = "tiny", image_size: int = 64, *, color_autocast: str | None = "float16",
                  checkpoints: Mapping[str, str | None] | None = None, allow_download: bool = False,
                  device: str = "cpu", dtype: str = "float32") -> Scorer:
    """Build the GenEval scorer for ``backend`` ``tiny`` or ``mask2former``.

    ``image_size``: the tiny world's side (``tiny`` only). ``color_autocast`` (``mask2former`` only,
    ``score.geneval_color_autocast``): autocast dtype of the CLIP colour forwards on CUDA, or None.
    ``checkpoints`` (``score.checkpoints``), ``allow_download``, ``device``, ``dtype``: where and how the
    ``mask2former`` backend loads its two models; a missing path is a ``FileNotFoundError`` naming
    ``score.checkpoints.<key>``.
    """
    if backend == "tiny":
        return GenEvalScorer(image_size=image_size)
    if backend == "mask2former":
        from soar.rewards.geneval_m2f import load_mask2former_geneval

        return load_mask2former_geneval({"mask2former": None, "clip_vit_l14": None, **(checkpoints or {})},
                                        allow_download=allow_download, device=device, dtype=dtype,
                                        color_autocast=color_autocast)
    raise ValueError(f"geneval: unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
