"""Stage `sample@{base,sft,soar}`: images for every prompt set, one fixed seed per image.

A rerun skips images already written (each PNG is written atomically), so a killed run resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.samples import image_path, save_png, write_index
from pipeline.tracking import stage_run
from soar.data.prompts import read_prompt_set
from soar.models.bundle import load_bundle
from soar.sampling import image_seed, sample
from stages.common import declared, load

BASE = "base"
MODELS = (BASE, "sft", "soar")
PARAMS = ("model", "sample", "mlflow")


def main(model: str) -> None:
    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    cfg = load(PARAMS)
    s = cfg.sample
    transformer = None if model == BASE else Path(cfg.model.models_dir) / model / "transformer"
    bundle = load_bundle(cfg.model.base_path, transformer_path=transformer, t5_max_length=cfg.model.t5_max_length)
    bundle.to("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with stage_run(cfg.mlflow, "sample", model, declared(cfg, PARAMS)) as run:
        for set_name, ps in s.prompt_sets.items():
            set_dir = Path(s.out_dir) / model / set_name
            entries = []
            for item in read_prompt_set(ps.path, ps.format):
                for j in range(ps.images_per_prompt):
                    path = image_path(set_dir, item.index, j)
                    entries.append({"prompt_index": item.index, "image_index": j, "prompt": item.prompt,
                                    "seed": image_seed(s.seed, item.index, j), "metadata": item.metadata,
                                    "path": str(path.relative_to(set_dir))})
            todo = [e for e in entries if not (set_dir / e["path"]).is_file()]
            for lo in tqdm(range(0, len(todo), s.batch_size), desc=f"sample {model}/{set_name}", unit="batch"):
                batch = todo[lo:lo + s.batch_size]
                images = sample(bundle, [e["prompt"] for e in batch], [e["seed"] for e in batch],
                                steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                resolution=s.resolution, dtype=dtype)
                for e, im in zip(batch, images, strict=True):
                    save_png(set_dir / e["path"], im)
            write_index(set_dir, entries)
            run.log_metrics({f"{set_name}/images": len(entries)})
            if cfg.mlflow.log_images:
                run.log_artifact(set_dir / entries[0]["path"], artifact_path=f"samples/{set_name}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
