"""Stage `prepare`: filter the training JSONL by quality and report what was dropped and why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.evaluation import build_scorers
from pipeline.tracking import stage_run
from soar.data.prepare import prepare_dataset
from soar.data.quality import image_quality
from soar.models.geometry import pixel_multiple
from stages.common import declared, load, run_main

PARAMS = ("data", "model", "score", "mlflow")  # model: the base folder's geometry; score: the aesthetic weights


def tiny_sharpness(images: list[np.ndarray]) -> np.ndarray:
    """Tiny-world quality (soar.data.quality.image_quality) of a batch of uint8 RGB images."""
    return np.array([image_quality(im) for im in images], dtype=np.float64)


def laion_aesthetic(score_cfg):
    """The LAION aesthetic predictor (the paper's filter), weights from ``score.checkpoints``."""
    return build_scorers(score_cfg, ["aesthetic"])["aesthetic"].predict


# data.quality -> builder of a batch quality function (list of uint8 [H, W, 3] -> float array)
QUALITY_FUNCTIONS = {"tiny_sharpness": lambda score_cfg: tiny_sharpness, "aesthetic": laion_aesthetic}


def main() -> None:
    cfg = load(PARAMS)
    d = cfg.data
    out = Path(d.prepared_dir)
    out.mkdir(parents=True, exist_ok=True)
    with stage_run(cfg.mlflow, "prepare", "filter", declared(cfg, PARAMS)) as run:
        report = prepare_dataset(d.jsonl_path, d.image_dir, out / "train.jsonl",
                                 quality_fn=QUALITY_FUNCTIONS[d.quality](cfg.score), threshold=d.quality_threshold,
                                 bucket_multiple=pixel_multiple(cfg.model.base_path))
        (out / "report.json").write_text(json.dumps(report, indent=2))
        print(f"prepare: {json.dumps(report)}")
        run.log_artifact(out / "report.json")
        run.log_metrics({k: v for k, v in report.items() if isinstance(v, int | float)})


if __name__ == "__main__":
    run_main("prepare", main)
