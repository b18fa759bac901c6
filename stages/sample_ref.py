"""Stage `sample_ref@<name>`: a reference model's images for every prompt set, through its own diffusers pipeline.

    python -m stages.sample_ref sdxl                                              # params.yaml references.sdxl
    accelerate launch --config_file pipeline/launch/multi_gpu.yaml --num_processes 8 -m stages.sample_ref sdxl

The prompts, seeds, fixed batches, resuming, folder layout and ``sampling.json`` guard are those of
``stages.sample`` (``pipeline.sample_sets``); the pipeline and its settings are the reference's own
(``pipeline.references``).
"""

from __future__ import annotations

import sys

import torch
from accelerate import PartialState

from pipeline.references import reference_digest, reference_sampler, reference_settings
from stages.common import load, run_main
from stages.sample import run_sampling

PARAMS = ("references", "sample", "mlflow")


def main(name: str) -> None:
    cfg = load(PARAMS)
    if name not in cfg.references:
        raise SystemExit(f"unknown reference model {name!r}; params.yaml references has: "
                         f"{', '.join(cfg.references) or 'none'}")
    ref = cfg.references[name]
    state = PartialState(cpu=not torch.cuda.is_available())
    run_sampling(cfg, name, state, ref.batch_size, digest=lambda: reference_digest(ref),
                 settings=lambda digest, entries: reference_settings(ref, digest, cfg.sample.seed, entries,
                                                                      state.device),
                 loader=lambda: reference_sampler(ref, name, state.device),
                 params={"references": {name: ref}, "sample": cfg.sample, "mlflow": cfg.mlflow})


if __name__ == "__main__":
    run_main("sample_ref", main, sys.argv[1] if len(sys.argv) > 1 else "")
