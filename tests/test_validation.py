"""Validation images: right steps and count, deterministic, main process only, logged as one grid per step."""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from test_text_cache import LOOP, RECORDS, SOAR, open_cache, world  # noqa: F401  (world: shared fixture)

from pipeline.grids import captioned_grid
from pipeline.training import validation_logger
from soar.models.bundle import load_bundle
from soar.text_cache import build_cache
from soar.train_config import ValidationConfig
from soar.trainer import train
from soar.validation import validation_images

PROMPTS = ("a photo of a red circle", "a photo of a green triangle")
SETTINGS = ValidationConfig(validation_steps=2, validation_prompts=PROMPTS, validation_num_inference_steps=3,
                            validation_guidance_scale=4.5, validation_resolution=16, validation_seed=7)
OFF = ValidationConfig(validation_steps=0)


def with_validation(loop, validation: ValidationConfig, **overrides):
    """``loop`` with the ``validation_*`` keys of ``validation``."""
    return dataclasses.replace(loop, **dataclasses.asdict(validation), **overrides)


def run(world, out, validation=SETTINGS, main=True, max_train_steps=4):  # noqa: F811
    calls = []
    bundle = load_bundle(world / "model")
    loop = with_validation(LOOP, validation, max_train_steps=max_train_steps)
    with mock.patch.object(Accelerator, "is_main_process", new_callable=mock.PropertyMock, return_value=main):
        train(bundle, RECORDS, world / "images", loop, SOAR, out, Accelerator(cpu=True), lambda m, s: None,
              on_validation=lambda images, step: calls.append((step, images)))
    return calls, bundle


def test_validation_at_every_nth_step_deterministic_and_training_unchanged(world, tmp_path):  # noqa: F811
    calls, bundle = run(world, tmp_path / "a")
    assert [s for s, _ in calls] == [2, 4]
    for _, images in calls:
        assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert not np.array_equal(calls[0][1], calls[1][1])  # the weights moved between steps 2 and 4
    assert bundle.transformer.training  # back in train mode after sampling
    # same weights + same seeds -> same images (prompts looked up in a text-embedding cache file)
    build_cache(load_bundle(world / "model"), world / "model", [*PROMPTS, ""], tmp_path / "v.pt")
    cached = open_cache(world, tmp_path / "v.pt")
    first = validation_images(bundle, bundle.transformer, cached, SETTINGS)
    assert np.array_equal(first, validation_images(bundle, bundle.transformer, cached, SETTINGS))
    # validation draws nothing from the training generator: same trained weights with it off
    _, plain = run(world, tmp_path / "b", validation=OFF)
    for p, q in zip(bundle.transformer.parameters(), plain.transformer.parameters(), strict=True):
        assert torch.equal(p, q)


def test_nothing_is_sampled_or_logged_on_other_processes(world, tmp_path):  # noqa: F811
    every_step = dataclasses.replace(SETTINGS, validation_steps=1, validation_num_inference_steps=2)
    calls, _ = run(world, tmp_path / "c", validation=every_step, main=False, max_train_steps=LOOP.max_train_steps)
    assert calls == []


def test_validation_off_or_without_prompts():
    assert not ValidationConfig(validation_steps=0, validation_prompts=PROMPTS).validation_enabled
    assert not ValidationConfig(validation_steps=5, validation_prompts=()).validation_due(5)
    assert SETTINGS.validation_due(4) and not SETTINGS.validation_due(3)


def test_logger_writes_one_captioned_grid_per_step():
    images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)])
    saved = []

    class FakeRun:
        def log_artifact(self, path, artifact_path=None):
            saved.append((path.name, artifact_path, np.asarray(Image.open(path))))

    prompts = ("a red circle", "a blue square", "a sign")
    validation_logger(FakeRun(), "train", "soar", prompts)(images, 100)
    (name, folder, grid), = saved
    assert (name, folder) == ("step_000100.png", "validation")
    expected = np.asarray(captioned_grid(list(images), list(prompts), title="train:soar step 100"))
    assert np.array_equal(grid, expected)
