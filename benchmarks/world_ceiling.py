"""The tiny world's ceiling: what GenEval and OCR give on the world's own renders of the evaluation prompts.

    python benchmarks/world_ceiling.py            # after `dvc repro synth`: reads params.yaml's prompt sets

For every entry of the sample stage's prompt sets (``pipeline.sample_sets.plan_sets``: prompt and seed) the world
draws the prompt as ``synth`` draws training images: a scene satisfying a GenEval line's metadata
(``scene_for_metadata``) or an OCR prompt's quoted word (``render_text``), at ``synth.image_size``, laid out
by the entry's seed. The sets are scored and named as in the study (``pipeline.study.score_metrics``: the
score stage's scorers, batches and metric names). A model that drew like the world would score these
numbers; the tiny models' scores (data/report/results.md) are to be read against them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.evaluation import build_scorers, scorer_names
from pipeline.sample_sets import plan_sets
from pipeline.study import score_metrics
from soar.data.tiny_render import render_scene, render_text
from soar.data.tiny_world import scene_for_metadata
from soar.rewards.ocr import extract_target

# How the world draws an entry of each prompt-set format (``soar.data.prompts``): uint8 RGB [size, size, 3].
RENDERERS = {
    "geneval": lambda e, size, rng: render_scene(scene_for_metadata(e["metadata"], size, rng), size),
    "text": lambda e, size, rng: render_text(extract_target(e["prompt"]), size, rng),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="configuration file (default params.yaml)")
    args = ap.parse_args()
    cfg = load_config(args.params)
    size = cfg.synth.image_size
    sets = {}
    for name, (_, entries) in plan_sets(cfg.sample, Path("renders")).items():
        render = RENDERERS[cfg.sample.prompt_sets[name].format]
        sets[name] = (np.stack([render(e, size, np.random.default_rng(e["seed"])) for e in entries]), entries)
    metrics = score_metrics(cfg, build_scorers(cfg.score, scorer_names(cfg.score.scorers)), sets)
    print(f"world renders at {size} px: " + ", ".join(f"{len(v[1])} {k} images" for k, v in sets.items()))
    for name, value in metrics.items():
        print(f"  {name}: {value:.4f}")


if __name__ == "__main__":
    main()
