"""Shared test helpers."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from pathlib import Path

from soar.flow import FlowMatchingConfig
from soar.rollout import SoarConfig
from soar.step import StepSettings
from soar.train_config import TrainConfig

# accelerate's launcher as dvc.yaml starts it: the `accelerate launch` command's own code and arguments, without the
# CLI's import of its other subcommands
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]

FLOW_KEYS = {f.name for f in dataclasses.fields(FlowMatchingConfig)}


def step_settings(**overrides) -> StepSettings:
    """The paper's SOAR step (the ``soar`` defaults, logit-normal times, no condition dropout) with ``overrides``
    of keys of either section (``FlowMatchingConfig`` or ``SoarConfig``)."""
    flow = {"cond_dropout_rate": 0.0, **{k: v for k, v in overrides.items() if k in FLOW_KEYS}}
    soar = {k: v for k, v in overrides.items() if k not in FLOW_KEYS}
    return StepSettings(FlowMatchingConfig(**flow), SoarConfig(**soar))


def train_config(**overrides) -> TrainConfig:
    """A test loop: ``TrainConfig`` without snapshots, checkpoint pruning, validation or prompt dropout, with
    ``overrides``."""
    return TrainConfig(**{"snapshot_steps": 0, "checkpoints_total_limit": None, "validation_steps": 0,
                          "cond_dropout_rate": 0.0, **overrides})


TINY_ARCH = dict(sample_size=16, patch_size=4, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                 joint_attention_dim=32, pooled_projection_dim=32, caption_projection_dim=16, qk_norm="rms_norm",
                 text_hidden_size=16, text_layers=1, text_max_length=12, shift=3.0)  # seconds-scale test model
TRAIN_CAPTIONS = ["a photo of a red circle", "a photo of two blue squares", 'a sign that says "CAT"',
                  "a photo of a green triangle"]


def write_tiny_training_world(root):
    """A tiny model folder and 8 random 16x16 training images under ``root``: ``(model_dir, image_dir, records)``."""
    import numpy as np
    from PIL import Image

    from soar.data.jsonl import TrainingRecord
    from soar.models.tiny import TinyModelConfig, write_tiny_model

    records = [TrainingRecord(md5=f"img{i}", caption=TRAIN_CAPTIONS[i % 4], bw=16, bh=16) for i in range(8)]
    write_tiny_model(root / "model", TinyModelConfig(**TINY_ARCH), TRAIN_CAPTIONS, seed=0)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for r in records:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(r.image_path(root / "images"))
    return root / "model", root / "images", records


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (for a rendezvous or a server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_launch_world(work, arch: dict, params_file) -> dict:
    """Under ``work``: a 16-image tiny world (its JSONL also as ``prepared/train.jsonl``) and a tiny model ``base``
    of architecture ``arch``; returns the repository's params (``params_file``) pointed at them, with a text cache."""
    import json
    import shutil

    from pipeline.config import read_params
    from soar.data.tiny_world import generate_world
    from soar.models.tiny import TinyModelConfig, write_tiny_model

    generate_world(work / "world", num_images=16, image_size=16, degraded_fraction=0.0, text_fraction=0.25,
                   num_eval_geneval=0, num_eval_ocr=0, seed=0)
    (work / "prepared").mkdir()
    shutil.copy(work / "world" / "train.jsonl", work / "prepared" / "train.jsonl")
    captions = [json.loads(line)["caption_en"] for line in (work / "world" / "train.jsonl").read_text().splitlines()]
    write_tiny_model(work / "base", TinyModelConfig(**arch), captions, seed=0)
    params = read_params(params_file)
    params["data"].update(jsonl_path="world/train.jsonl", image_dir="world/images", prepared_dir="prepared",
                          text_cache="cache/text.pt")
    params["model"].update(base_path="base", tiny=arch)
    return params


def start_mlflow_server(store: str, cwd: Path, port: int, *extra: str) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port`` over ``store``, started in ``cwd``, once it answers."""
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", store, "--workers", "1", *extra],
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(240):  # the server needs a few seconds to start
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            assert server.poll() is None, server.stderr.read()[-2000:]
            time.sleep(0.5)
    server.kill()
    raise AssertionError(f"mlflow server on port {port} did not start in 120 s")
