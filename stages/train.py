"""Stage `train@{sft,soar}`: post-train the base transformer; SFT is the same trainer with lambda_aux = 0.

Run through ``accelerate launch ... -m stages.train <method>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.training import run_training
from soar.models.bundle import load_bundle
from stages.common import declared, load

METHOD_PARAMS = {"sft": ("data", "model", "train", "mlflow"), "soar": ("data", "model", "train", "soar", "mlflow")}


def main(method: str) -> None:
    if method not in METHOD_PARAMS:
        raise SystemExit(f"unknown method {method!r}; expected one of {', '.join(METHOD_PARAMS)}")
    params = METHOD_PARAMS[method]
    cfg = load(params)
    bundle = load_bundle(cfg.model.base_path, t5_max_length=cfg.model.t5_max_length,
                         text_encoders=cfg.data.text_cache is None)  # with a cache they are never needed
    out = Path(cfg.model.models_dir) / method
    prepared = Path(cfg.data.prepared_dir) / "train.jsonl"
    run_training(bundle, cfg.train, cfg.soar, prepared, cfg.data.image_dir, out, stage="train", method=method,
                 mlflow_cfg=cfg.mlflow, params=declared(cfg, params),
                 dataloader_num_workers=cfg.data.dataloader_num_workers, text_cache=cfg.data.text_cache,
                 model_dir=cfg.model.base_path, latent_cache=cfg.data.latent_cache)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
