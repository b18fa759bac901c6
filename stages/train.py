"""Stage `train@{sft,soar}`: post-train the base transformer; SFT is the same trainer with lambda_aux = 0.

Run through ``accelerate launch ... -m stages.train <method>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.training import post_train
from stages.common import declared, load

METHOD_PARAMS = {"sft": ("data", "model", "train", "mlflow"), "soar": ("data", "model", "train", "soar", "mlflow")}


def main(method: str) -> None:
    if method not in METHOD_PARAMS:
        raise SystemExit(f"unknown method {method!r}; expected one of {', '.join(METHOD_PARAMS)}")
    params = METHOD_PARAMS[method]
    cfg = load(params)
    post_train(cfg, method, Path(cfg.model.models_dir) / method, params=declared(cfg, params))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
