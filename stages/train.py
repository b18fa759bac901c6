"""Stage `train@{sft,soar,grpo}`: post-train the base transformer; SFT is the same trainer with lambda_aux = 0,
GRPO its own loop (``pipeline.grpo``) on sampled images and a reward.

Run through ``accelerate launch ... -m stages.train <method>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.grpo import run_grpo
from pipeline.training import post_train
from soar import atomic
from stages.common import declared, load, run_main

# The output folder (weights, checkpoints, snapshots: ~100 GB at SD3.5-M size) is a DVC output with `cache: false`,
# so DVC neither copies it into its cache nor writes a .gitignore entry for it; this file keeps it out of git.
GITIGNORE = "# weights, checkpoints and snapshots: a DVC output kept out of DVC's cache and out of git\n*\n"

METHOD_PARAMS = {"sft": ("data", "model", "train", "mlflow"), "soar": ("data", "model", "train", "soar", "mlflow"),
                 "grpo": ("model", "grpo", "score", "mlflow")}


def main(method: str) -> None:
    if method not in METHOD_PARAMS:
        raise SystemExit(f"unknown method {method!r}; expected one of {', '.join(METHOD_PARAMS)}")
    params = METHOD_PARAMS[method]
    cfg = load(params)
    out = Path(cfg.model.models_dir) / method
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / ".gitignore", GITIGNORE)  # every process writes the same bytes
    if method == "grpo":
        run_grpo(cfg, out, params=declared(cfg, params))
    else:
        post_train(cfg, method, out, params=declared(cfg, params))


if __name__ == "__main__":
    run_main("train", main, sys.argv[1] if len(sys.argv) > 1 else "")
