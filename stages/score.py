"""Stage `score@{base,sft,soar}`: per-image scores (JSONL) and per-set metrics (DVC metrics)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.samples import load_image, read_index
from pipeline.tracking import stage_run
from soar.rewards import build_scorer
from stages.common import declared, load

PARAMS = ("sample", "score", "mlflow")


def scorer_options(score_cfg) -> dict[str, dict]:
    """Factory options per scorer name, from the ``score`` section."""
    return {"geneval": {"backend": score_cfg.geneval_backend}, "ocr": {"upscale_to": score_cfg.ocr_upscale}}


def main(model: str) -> None:
    cfg = load(PARAMS)
    sc = cfg.score
    out = Path(sc.out_dir) / model
    out.mkdir(parents=True, exist_ok=True)
    options = scorer_options(sc)
    names = sorted({n for names in sc.scorers.values() for n in names})
    scorers = {n: build_scorer(n, **options.get(n, {})) for n in names}  # built once per stage
    metrics: dict[str, float] = {}
    rows = []
    with stage_run(cfg.mlflow, "score", model, declared(cfg, PARAMS)) as run:
        for set_name, scorer_names in sc.scorers.items():
            set_dir = Path(cfg.sample.out_dir) / model / set_name
            entries = read_index(set_dir)
            records = {n: [] for n in scorer_names}
            for lo in tqdm(range(0, len(entries), sc.batch_size), desc=f"score {model}/{set_name}", unit="batch"):
                batch = entries[lo:lo + sc.batch_size]
                images = np.stack([load_image(set_dir / e["path"]) for e in batch])
                for n in scorer_names:
                    records[n].extend(scorers[n].score(images, [e["prompt"] for e in batch],
                                                       [e["metadata"] for e in batch]))
            for n in scorer_names:
                metrics.update(scorers[n].aggregate(records[n]))
                for e, r in zip(entries, records[n], strict=True):
                    rows.append({"set": set_name, "scorer": n, "prompt_index": e["prompt_index"],
                                 "image_index": e["image_index"], "prompt": e["prompt"], "score": r.score,
                                 "details": r.details})
        (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"score {model}: {json.dumps(metrics, sort_keys=True)}")
        run.log_metrics(metrics)
        run.log_artifact(out / "scores.jsonl")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
