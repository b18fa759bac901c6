"""Weights-only snapshots for training dynamics: the right steps, the sampled (EMA / merged LoRA) weights,
training untouched, and a resumed run keeps the snapshots it already has.

Tiny one-layer model on 16x16 images (CPU), a second or two per run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_checkpoint import assert_same, load, run_train

from soar.finetune import LORA_DIR
from soar.snapshots import TRANSFORMER, list_snapshots, snapshot_folder

WEIGHTS = "diffusion_pytorch_model.safetensors"
PLAIN = dict(lr_scheduler="constant", lr_warmup_steps=0, gradient_accumulation_steps=1, checkpointing_steps=0,
             resume_from_checkpoint=None)  # constant LR: the first k steps do not depend on max_train_steps


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    from helpers import write_tiny_training_world

    model_dir, image_dir, _ = write_tiny_training_world(tmp_path_factory.mktemp("snap_world"))
    return model_dir, image_dir


def weights(folder: Path) -> dict:
    return load(folder / WEIGHTS)


def differ(a: dict, b: dict) -> bool:
    return any(not (a[k] == b[k]).all() for k in a)


def test_snapshots_hold_the_ema_weights_and_leave_training_alone(world, tmp_path):
    model, images = world
    snap, plain, short = tmp_path / "snap", tmp_path / "plain", tmp_path / "short"
    run_train(model, images, snap, **PLAIN, ema_decay=0.9, max_train_steps=4, snapshot_steps=2)
    run_train(model, images, plain, **PLAIN, ema_decay=0.9, max_train_steps=4)
    run_train(model, images, short, **PLAIN, ema_decay=0.9, max_train_steps=2)

    assert [(s, p) for s, p in list_snapshots(snap)] == [(2, snapshot_folder(snap, 2) / TRANSFORMER),
                                                         (4, snapshot_folder(snap, 4) / TRANSFORMER)]
    assert not list_snapshots(plain) and not (plain / "snapshots").exists()
    for folder in ("transformer", "transformer_raw"):  # snapshotting did not change training
        assert_same(weights(snap / folder), weights(plain / folder), folder)
    step2 = weights(snapshot_folder(snap, 2) / TRANSFORMER)
    assert_same(step2, weights(short / "transformer"), "step 2 = EMA after 2 steps")
    assert differ(step2, weights(short / "transformer_raw"))  # the EMA, not the trained weights
    assert_same(weights(snapshot_folder(snap, 4) / TRANSFORMER), weights(snap / "transformer"), "step 4 = final")
    assert differ(step2, weights(snap / "transformer"))


def test_lora_snapshots_are_merged_and_leave_training_alone(world, tmp_path):
    pytest.importorskip("peft")
    model, images = world
    lora = dict(lora_rank=2, lora_alpha=4.0, lora_target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    snap, plain = tmp_path / "snap", tmp_path / "plain"
    torch.manual_seed(0)  # peft draws the adapters' initial values from the global generator
    run_train(model, images, snap, **PLAIN, ema_decay=None, **lora, max_train_steps=2, snapshot_steps=1)
    torch.manual_seed(0)
    run_train(model, images, plain, **PLAIN, ema_decay=None, **lora, max_train_steps=2)

    assert [s for s, _ in list_snapshots(snap)] == [1, 2]
    assert_same(weights(snap / "transformer"), weights(plain / "transformer"), "merged final")
    final = weights(snapshot_folder(snap, 2) / TRANSFORMER)
    assert final.keys() == weights(model / "transformer").keys()  # a plain transformer: LoRA merged
    assert_same(final, weights(snap / "transformer"), "step 2 = final")
    step1 = weights(snapshot_folder(snap, 1) / TRANSFORMER)
    assert differ(step1, weights(model / "transformer")) and differ(step1, final)
    assert (snapshot_folder(snap, 1) / LORA_DIR).is_dir()


def test_resumed_run_keeps_the_snapshots_it_has(world, tmp_path):
    model, images = world
    first = dict(PLAIN, ema_decay=None, snapshot_steps=1, checkpointing_steps=2)
    run_train(model, images, tmp_path, **first, max_train_steps=2)
    before = (snapshot_folder(tmp_path, 1) / TRANSFORMER / WEIGHTS).read_bytes()
    run_train(model, images, tmp_path, **{**first, "resume_from_checkpoint": "latest"}, max_train_steps=3)
    assert [s for s, _ in list_snapshots(tmp_path)] == [1, 2, 3]
    assert (snapshot_folder(tmp_path, 1) / TRANSFORMER / WEIGHTS).read_bytes() == before
    assert_same(weights(snapshot_folder(tmp_path, 3) / TRANSFORMER), weights(tmp_path / "transformer"), "final")
    assert not list((tmp_path / "snapshots").glob(".*"))  # no temporary folder left
