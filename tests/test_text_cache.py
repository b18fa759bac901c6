"""Text-embedding cache: round trip, shards, reuse without the encoders, missing captions, invalidation, atomicity."""

from __future__ import annotations

import json
import pickle
import random
import shutil

import pytest
import torch
from accelerate import Accelerator
from helpers import TINY_ARCH, TRAIN_CAPTIONS, train_config, write_tiny_training_world
from safetensors.torch import load_file

from soar import text_cache
from soar.data.jsonl import TrainingRecord
from soar.models.bundle import SD3Bundle, load_bundle
from soar.models.tiny import TinyModelConfig, build_text_encoder
from soar.rollout import SoarConfig
from soar.text_cache import build_cache, encode_table, load_cache
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
    build_cache(bundle, root / "model", [*CAPTIONS, ""], root / "cache" / "text")
    return root


def open_cache(root, path=None, **kwargs):
    return load_cache(path or root / "cache" / "text", root / "model", t5_max_length=77,
                      joint_attention_dim=ARCH.joint_attention_dim, **kwargs)


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
    build_cache(load_bundle(world / "model"), world / "model", many * 2, tmp_path / "many")
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
    path = tmp_path / "partial"
    build_cache(load_bundle(world / "model"), world / "model", [*CAPTIONS[:3], ""], path)
    with pytest.raises(KeyError, match=r"green triangle.*/partial \("):
        train(load_bundle(world / "model"), RECORDS, world / "images", LOOP, SOAR, tmp_path / "out",
              Accelerator(cpu=True), lambda m, s: None, text=open_cache(world, path))


def test_changed_encoder_or_length_invalidates_the_key(world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(world / "model", model)
    path = tmp_path / "c"
    build_cache(load_bundle(model), model, CAPTIONS, path)
    (model / "text_encoder_2" / "config.json").touch()  # same bytes, new mtime: rehashed, still valid
    load_cache(path, model, t5_max_length=77, joint_attention_dim=ARCH.joint_attention_dim)
    with pytest.raises(ValueError, match="other text encoders"):
        load_cache(path, model, t5_max_length=64, joint_attention_dim=ARCH.joint_attention_dim)
    tokenizer = load_bundle(model).clip_tokenizers[1]
    build_text_encoder(tokenizer, ARCH, seed=99).save_pretrained(model / "text_encoder_2")  # new weights
    with pytest.raises(ValueError, match=r"text_encoder_2/model\.safetensors"):
        load_cache(path, model, t5_max_length=77, joint_attention_dim=ARCH.joint_attention_dim)


def test_missing_cache_says_how_to_build_it(world, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope not found.*dvc repro embed"):
        open_cache(world, tmp_path / "nope")
    (tmp_path / "old.pt").write_bytes(b"a single-file cache of the previous format")
    with pytest.raises(ValueError, match=r"old\.pt is a file.*dvc repro embed"):
        open_cache(world, tmp_path / "old.pt")


MANY = [f"a photo of {i} red circles" for i in range(10)] + [*CAPTIONS, ""]  # 15 distinct captions


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_cache_equals_the_in_memory_table_across_shards(world, tmp_path, dtype):
    bundle = load_bundle(world / "model")
    table = build_cache(bundle, world / "model", MANY, tmp_path / "c", dtype=dtype, batch=4, shard_rows=6)
    assert [p.name for p in table.paths] == [f"shard-0000{i}.safetensors" for i in range(3)]  # 6 + 6 + 3 rows
    memory = encode_table(bundle, MANY, text_cache.DTYPES[dtype], batch=4)  # same batches: the same numbers
    assert table.embeds_shape == memory.embeds.shape and table.pooled_shape == memory.pooled.shape
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["captions"] == sorted(MANY) and meta["rows"] == 15  # rows in sorted caption order
    order = [*MANY, *MANY[:5]]
    random.Random(0).shuffle(order)  # any order, repeats, rows from every shard in one lookup
    for got, want in zip(open_cache(world, tmp_path / "c").lookup(order), memory.lookup(order), strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    shards = [load_file(p) for p in table.paths]  # each shard is a plain safetensors file
    assert torch.equal(torch.cat([s["embeds"] for s in shards]), memory.embeds)
    assert torch.equal(torch.cat([s["pooled"] for s in shards]), memory.pooled)
    assert shards[0]["embeds"].dtype == text_cache.DTYPES[dtype]


def test_build_writes_batch_by_batch_and_lookups_are_fresh(world, tmp_path, monkeypatch, count_encodes):
    writes = []
    original = text_cache.write_rows

    def recording(folder, layout, first, embeds, pooled):
        writes.append((first, len(embeds), len(pooled)))
        original(folder, layout, first, embeds, pooled)

    monkeypatch.setattr(text_cache, "write_rows", recording)
    build_cache(load_bundle(world / "model"), world / "model", MANY, tmp_path / "c", batch=4, shard_rows=6)
    assert [len(c) for c in count_encodes] == [4, 4, 4, 3]
    # never more than one batch in hand, split at the shard boundaries (rows 6 and 12), every row once
    assert writes == [(0, 4, 4), (4, 2, 2), (6, 2, 2), (8, 4, 4), (12, 3, 3)]
    table = open_cache(world, tmp_path / "c")
    embeds, pooled = table.lookup(CAPTIONS[:2])
    before = embeds.clone(), pooled.clone()
    embeds.add_(1.0)
    pooled.zero_()
    again = table.lookup(CAPTIONS[:2])
    assert torch.equal(again[0], before[0]) and torch.equal(again[1], before[1])
    assert again[0].data_ptr() != embeds.data_ptr()
    clone = pickle.loads(pickle.dumps(table))  # e.g. a spawned worker: opens its own file descriptors
    assert torch.equal(clone.lookup(CAPTIONS[:2])[0], before[0])


def test_failed_build_leaves_the_previous_cache_and_no_half_cache(world, tmp_path, monkeypatch):
    path = tmp_path / "c"
    build_cache(load_bundle(world / "model"), world / "model", CAPTIONS, path, batch=2, shard_rows=2)
    before = open_cache(world, path).lookup(CAPTIONS)
    (tmp_path / ".c.tmp").mkdir()  # what a killed build leaves: cleared by the next build
    (tmp_path / ".c.tmp" / "shard-00000.safetensors").write_bytes(b"half")
    calls = []
    original = SD3Bundle.encode_prompts

    def dying(self, prompts):
        calls.append(prompts)
        if len(calls) == 3:
            raise RuntimeError("killed mid-build")
        return original(self, prompts)

    monkeypatch.setattr(SD3Bundle, "encode_prompts", dying)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_cache(load_bundle(world / "model"), world / "model", MANY, path, batch=2, shard_rows=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left
    table = open_cache(world, path)  # the previous complete cache, intact
    assert set(table.rows) == set(CAPTIONS)
    assert all(torch.equal(a, b) for a, b in zip(table.lookup(CAPTIONS), before, strict=True))
    calls.clear()
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_cache(load_bundle(world / "model"), world / "model", MANY, tmp_path / "fresh", batch=2)
    assert not (tmp_path / "fresh").exists() and not (tmp_path / ".fresh.tmp").exists()


def test_encoder_dtype_is_part_of_the_key(world, tmp_path):
    bundle = load_bundle(world / "model")
    with pytest.raises(ValueError, match=r"build_cache .*/c: .*\['float32'\].*text_encoder_dtype=bfloat16"):
        build_cache(bundle, world / "model", CAPTIONS, tmp_path / "c", text_encoder_dtype="bfloat16")
    for encoder in bundle.clip_encoders:
        encoder.to(torch.bfloat16)
    table = build_cache(bundle, world / "model", CAPTIONS, tmp_path / "c", text_encoder_dtype="bfloat16")
    assert table.lookup(CAPTIONS)[0].dtype == torch.float32
    open_cache(world, tmp_path / "c", text_encoder_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"cache .*/c was built for other text encoders.*"
                                         r"text_encoder_dtype bfloat16 \(now float32\)"):
        open_cache(world, tmp_path / "c")  # float32, the default


def test_truncated_shard_is_refused(world, tmp_path):
    build_cache(load_bundle(world / "model"), world / "model", MANY, tmp_path / "c", shard_rows=6)
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors is truncated.*dvc repro embed"):
        open_cache(world, tmp_path / "c")
