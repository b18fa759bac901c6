"""The tiny world's ceiling: what GenEval and OCR give on the world's own renders of the evaluation prompts.

    python benchmarks/world_ceiling.py            # after `dvc repro synth`: reads params.yaml's prompt sets

For every line of the GenEval prompt set a scene that satisfies its metadata is rendered
(``scene_for_metadata``, as ``synth`` renders training images), and for every OCR prompt its quoted word
(``render_text``); both at ``synth.image_size``, then scored by the scorers of ``score.scorers`` exactly as
the score stage builds them. A model that drew like the world would score these numbers; the tiny base
model's scores (data/report/results.md) are to be read against them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.scoring import build_scorers
from soar.data.tiny_render import render_scene, render_text
from soar.data.tiny_world import scene_for_metadata
from soar.rewards.ocr import extract_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="configuration file (default params.yaml)")
    ap.add_argument("--seed", type=int, default=0, help="layout / jitter seed of the renders")
    args = ap.parse_args()
    cfg = load_config(args.params)
    size = cfg.synth.image_size
    sets = cfg.sample.prompt_sets
    geneval_lines = Path(sets["geneval"].path).read_text(encoding="utf-8").splitlines()
    metadata = [json.loads(line) for line in geneval_lines if line.strip()]
    prompts = [line for line in Path(sets["ocr"].path).read_text(encoding="utf-8").splitlines() if line.strip()]
    scenes = np.stack([render_scene(scene_for_metadata(m, size, np.random.default_rng([args.seed, i])), size)
                       for i, m in enumerate(metadata)])
    signs = np.stack([render_text(extract_target(p), size, np.random.default_rng([args.seed, i]))
                      for i, p in enumerate(prompts)])
    scorers = build_scorers(cfg.score, ["geneval", "ocr"])
    geneval = scorers["geneval"].aggregate(scorers["geneval"].score(scenes, [m["prompt"] for m in metadata], metadata))
    ocr = scorers["ocr"].aggregate(scorers["ocr"].score(signs, prompts, [{} for _ in prompts]))
    print(f"world renders at {size} px: {len(metadata)} GenEval prompts, {len(prompts)} OCR prompts")
    for name, value in {**geneval, **ocr}.items():
        print(f"  {name}: {value:.4f}")


if __name__ == "__main__":
    main()
