"""Stage `embed`: encode every training caption, "" and the validation prompts once into the text cache.

train@sft and train@soar read the cache (``soar.text_cache``: a folder of safetensors shards, read row by
row) instead of running the text encoders. The text encoders run in ``model.text_encoder_dtype``, which is
part of the cache's key.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.tracking import stage_run
from soar.data.jsonl import read_clean_records
from soar.models.bundle import load_bundle
from soar.text_cache import build_cache
from stages.common import declared, load, run_main

PARAMS = ("data", "model", "train", "mlflow")


def main() -> None:
    cfg = load(PARAMS)
    if cfg.data.text_cache is None:
        raise SystemExit("data.text_cache is null: nothing to build (train@* encode the captions in memory)")
    jsonl = Path(cfg.data.prepared_dir) / "train.jsonl"
    records = read_clean_records(jsonl)
    captions = {r.caption for r in records} | {""} | set(cfg.train.validation_prompts)
    encoder_dtype = cfg.model.text_encoder_dtype
    bundle = load_bundle(cfg.model.base_path, t5_max_length=cfg.model.t5_max_length,
                         text_encoder_dtype=getattr(torch, encoder_dtype))
    bundle.to("cuda" if torch.cuda.is_available() else "cpu")
    with stage_run(cfg.mlflow, "embed", "text", declared(cfg, PARAMS)) as run:
        tic = time.perf_counter()
        table = build_cache(bundle, cfg.model.base_path, captions, cfg.data.text_cache,
                            dtype=cfg.data.text_cache_dtype, text_encoder_dtype=encoder_dtype)
        seconds = time.perf_counter() - tic
        run.log_metrics({"captions": len(table.rows), "seconds": seconds, "bytes": table.nbytes})
    print(f"embed: {len(table.rows)} captions -> {cfg.data.text_cache}: embeds {list(table.embeds_shape)}, "
          f"pooled {list(table.pooled_shape)} {cfg.data.text_cache_dtype} (encoders in {encoder_dtype}), "
          f"{table.nbytes / 1e9:.3f} GB in {len(table.paths)} shard(s), {seconds:.2f}s", flush=True)


if __name__ == "__main__":
    run_main("embed", main)
