"""Stage `pretrain`: build the tiny SD3 model from scratch and train it by plain flow matching.

Only the tiny profile needs it: when ``model.base_path`` names another folder than ``model.pretrain_dir``
(the paper profile's SD3.5-Medium), the stage reads no data and trains nothing; it writes a note into
``model.pretrain_dir`` (its DVC output) saying so, and the rest of the graph never depends on it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.training import run_training
from soar.data.jsonl import read_clean_records
from soar.models.bundle import load_bundle
from soar.models.tiny import write_tiny_model
from stages.common import declared, load, run_main

PARAMS = ("data", "model", "pretrain", "mlflow")


SKIPPED = "NOT_BUILT.md"  # the note written instead of a tiny base


def main() -> None:
    cfg = load(PARAMS)
    out = Path(cfg.model.pretrain_dir)
    if out.resolve() != Path(cfg.model.base_path).resolve():
        out.mkdir(parents=True, exist_ok=True)
        (out / SKIPPED).write_text(
            f"The tiny base is not built here: model.base_path ({cfg.model.base_path}) names another model than "
            f"model.pretrain_dir ({cfg.model.pretrain_dir}), so SFT and SOAR start from that one. Set both to the "
            "same folder (the tiny profile) to pretrain the tiny base.\n")
        print(f"pretrain: skipped, model.base_path is {cfg.model.base_path} (note in {out / SKIPPED})", flush=True)
        return
    captions = [r.caption for r in read_clean_records(cfg.data.jsonl_path)]
    write_tiny_model(out, cfg.model.tiny, captions, seed=cfg.pretrain.seed)
    bundle = load_bundle(out)
    run_training(bundle, cfg.pretrain, None, cfg.data.jsonl_path, cfg.data.image_dir, out, stage="pretrain",
                 method="base", mlflow_cfg=cfg.mlflow, params=declared(cfg, PARAMS),
                 dataloader_num_workers=cfg.data.dataloader_num_workers, image_memory_mib=cfg.data.image_memory_mib)


if __name__ == "__main__":
    run_main("pretrain", main)
