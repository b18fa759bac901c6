"""Stage `score@{base,sft,soar}`: per-image scores (JSONL) and per-set metrics (DVC metrics).

Every scorer named in ``score.scorers`` is built once, from ``score.*`` (weights from
``score.checkpoints``), and applied to its prompt sets in batches of ``score.batch_size``. A scorer
used on one set reports its metrics under their own names (``pickscore``: the report's columns); a
scorer used on several sets reports ``{set}/{metric}`` for each, so no set's number overwrites another.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.samples import load_image, read_index
from pipeline.scoring import build_scorers
from pipeline.tracking import stage_run
from stages.common import declared, load

PARAMS = ("sample", "score", "mlflow")


def main(model: str) -> None:
    cfg = load(PARAMS)
    sc = cfg.score
    out = Path(sc.out_dir) / model
    out.mkdir(parents=True, exist_ok=True)
    uses = Counter(n for names in sc.scorers.values() for n in names)
    scorers = build_scorers(sc, sorted(uses))
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
                prefix = f"{set_name}/" if uses[n] > 1 else ""
                metrics.update({prefix + k: v for k, v in scorers[n].aggregate(records[n]).items()})
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
