"""Stage `pretrain`: build the tiny SD3 model from scratch and train it by plain flow matching."""

from __future__ import annotations

from pathlib import Path

from pipeline.training import run_training
from soar.data.jsonl import read_clean_records
from soar.models.bundle import load_bundle
from soar.models.tiny import write_tiny_model
from stages.common import declared, load

PARAMS = ("data", "model", "pretrain", "mlflow")


def main() -> None:
    cfg = load(PARAMS)
    out = Path(cfg.model.pretrain_dir)
    captions = [r.caption for r in read_clean_records(cfg.data.jsonl_path)]
    write_tiny_model(out, cfg.model.tiny, captions, seed=cfg.pretrain.seed)
    bundle = load_bundle(out)
    run_training(bundle, cfg.pretrain, None, cfg.data.jsonl_path, cfg.data.image_dir, out, stage="pretrain",
                 method="base", mlflow_cfg=cfg.mlflow, params=declared(cfg, PARAMS),
                 dataloader_num_workers=cfg.data.dataloader_num_workers)


if __name__ == "__main__":
    main()
