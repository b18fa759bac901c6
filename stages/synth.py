"""Stage `synth`: write the tiny world (training JSONL + images, evaluation prompt sets)."""

from __future__ import annotations

from pathlib import Path

from pipeline.tracking import stage_run
from soar.data.tiny_world import generate_world
from stages.common import declared, load, run_main

PARAMS = ("synth", "mlflow")


def main() -> None:
    cfg = load(PARAMS)
    s = cfg.synth
    with stage_run(cfg.mlflow, "synth", "world", declared(cfg, PARAMS)) as run:
        summary = generate_world(Path(s.out_dir), num_images=s.num_images, image_size=s.image_size,
                                 degraded_fraction=s.degraded_fraction, text_fraction=s.text_fraction,
                                 num_eval_geneval=s.num_eval_geneval, num_eval_ocr=s.num_eval_ocr,
                                 num_heldout=s.num_heldout, num_grpo_prompts=s.num_grpo_prompts, seed=s.seed)
        print(f"synth: wrote {s.out_dir}: {summary}")
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})


if __name__ == "__main__":
    run_main("synth", main)
