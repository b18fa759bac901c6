"""Text-embedding cache: round trip, reuse without the encoders, missing captions, invalidation by the encoders."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from helpers import TINY_ARCH, TRAIN_CAPTIONS, train_config, write_tiny_training_world

from soar.data.jsonl import TrainingRecord
from soar.models.bundle import SD3Bundle, load_bundle
from soar.models.tiny import TinyModelConfig, build_text_encoder
from soar.rollout import SoarConfig
from soar.text_cache import build_cache, load_cache
from soar.trainer import train

ARCH = TinyModelConfig(**TINY_ARCH)
CAPTIONS = TRAIN_CAPTIONS
RECORDS = [TrainingRecord(md5=f"img{i}", caption=CAPTIONS[i % 4], bw=16, bh=16) for i in range(8)]
LOOP = train_config(seed=1, learning_rate=1e-3, lr_scheduler="constant", lr_warmup_steps=0, adam_weight_decay=0.0,
                    max_grad_norm=1.0, train_batch_size=2, gradient_accumulation_steps=1, max_train_steps=2,
                    checkpointing_steps=0, gradient_checkpointing=False, log_every=1)
SOAR = SoarConfig(trajectory_length=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_cache")
    write_tiny_training_world(root)
    bundle = load_bundle(root / "model")
    build_cache(bundle, root / "model", [*CAPTIONS, ""], root / "cache" / "text.pt")
    return root


def open_cache(root, path=None):
    return load_cache(path or root / "cache" / "text.pt", root / "model", t5_max_length=77,
                      joint_attention_dim=ARCH.joint_attention_dim)


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    original = SD3Bundle.encode_prompts

    def counting(self, prompts):
        calls.append(list(prompts))
        return original(self, prompts)

    monkeypatch.setattr(SD3Bundle, "encode_prompts", counting)
    return calls


def test_cache_round_trip_equals_encode_prompts(world):
    table = open_cache(world)
    assert set(table.rows) == {*CAPTIONS, ""}
    unique = sorted({*CAPTIONS, ""})  # the cache encodes the sorted distinct captions in one batch
    embeds, pooled = load_bundle(world / "model").encode_prompts(unique)
    got_e, got_p = table.lookup(unique)
    assert torch.equal(got_e, embeds) and torch.equal(got_p, pooled)
    e1, p1 = load_bundle(world / "model").encode_prompts([CAPTIONS[2]])  # one caption alone: same numbers
    torch.testing.assert_close(table.lookup([CAPTIONS[2]])[0], e1, rtol=0, atol=1e-6)
    torch.testing.assert_close(table.lookup([CAPTIONS[2]])[1], p1, rtol=0, atol=1e-6)


def test_build_encodes_in_batches_and_runs_reuse_the_cache(world, tmp_path, count_encodes):
    many = [f"a photo of {i} circles" for i in range(300)]
    build_cache(load_bundle(world / "model"), world / "model", many * 2, tmp_path / "many.pt")
    assert [len(c) for c in count_encodes] == [256, 44]  # 300 distinct captions, batched, each once
    count_encodes.clear()
    for out in ("sft", "soar"):  # two runs, both from the cache: the text encoders never run
        bundle = load_bundle(world / "model")
        train(bundle, RECORDS, world / "images", LOOP, SOAR, tmp_path / out, Accelerator(cpu=True),
              lambda m, s: None, text=open_cache(world))
        assert all(p.device.type == "cpu" for enc in bundle.clip_encoders for p in enc.parameters())
    assert count_encodes == []


def test_in_memory_cache_encodes_each_caption_once(world, tmp_path, count_encodes):
    train(load_bundle(world / "model"), RECORDS, world / "images", LOOP, SOAR, tmp_path / "mem",
          Accelerator(cpu=True), lambda m, s: None)
    assert len(count_encodes) == 1 and sorted(count_encodes[0]) == sorted({*CAPTIONS, ""})


def test_missing_caption_is_an_error_naming_it_and_the_file(world, tmp_path):
    path = tmp_path / "partial.pt"
    build_cache(load_bundle(world / "model"), world / "model", [*CAPTIONS[:3], ""], path)
    with pytest.raises(KeyError, match=r"green triangle.*partial\.pt"):
        train(load_bundle(world / "model"), RECORDS, world / "images", LOOP, SOAR, tmp_path / "out",
              Accelerator(cpu=True), lambda m, s: None, text=open_cache(world, path))


def test_changed_encoder_or_length_invalidates_the_key(world, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(world / "model", model)
    path = tmp_path / "c.pt"
    build_cache(load_bundle(model), model, CAPTIONS, path)
    (model / "text_encoder_2" / "config.json").touch()  # same bytes, new mtime: rehashed, still valid
    load_cache(path, model, t5_max_length=77, joint_attention_dim=ARCH.joint_attention_dim)
    with pytest.raises(ValueError, match="other text encoders"):
        load_cache(path, model, t5_max_length=64, joint_attention_dim=ARCH.joint_attention_dim)
    tokenizer = load_bundle(model).clip_tokenizers[1]
    build_text_encoder(tokenizer, ARCH, seed=99).save_pretrained(model / "text_encoder_2")  # new weights
    with pytest.raises(ValueError, match=r"text_encoder_2/model\.safetensors"):
        load_cache(path, model, t5_max_length=77, joint_attention_dim=ARCH.joint_attention_dim)


def test_missing_cache_file_says_how_to_build_it(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro embed"):
        open_cache(world, tmp_path / "nope.pt")
