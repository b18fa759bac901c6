"""Training JSONL, prepare-stage filtering report, bucket dataset and the distributed sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from soar.data.dataset import (
    BucketBatchSampler,
    ImageCaptionDataset,
    collate,
    resize_center_crop,
)
from soar.data.images import ImageLoadError
from soar.data.jsonl import JsonlError, read_jsonl, read_training_records
from soar.data.prepare import prepare_dataset


def save_jpg(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path, quality=95)


def line(md5, caption="a caption", bw=32, bh=32, **extra):
    return json.dumps({"md5": md5, "caption_en": caption, "bw": bw, "bh": bh, **extra})


# ----------------------------------------------------------------------------- JSONL


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(JsonlError, match=r"x\.jsonl:3: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(JsonlError, match=r"x\.jsonl:2: expected a JSON object"):
        read_jsonl(path)


def test_training_problems_carry_line_numbers_and_keys(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [
        line("good1", extra_key=7),  # 1
        "{not json",  # 2
        json.dumps({"md5": "nocap", "bw": 32, "bh": 32}),  # 3 missing caption_en
        line("badw", bw="32"),  # 4 ill-typed bw
        line("boolh", bh=True),  # 5 bool is not an int
        line("spaced id", caption="x"),  # 6 fine
        line("../evil"),  # 7 unusable file name
        line("empty", caption="  "),  # 8 empty caption
        "",  # 9 blank line: skipped
        line("good2", bw=48, bh=16),  # 10
    ]
    path.write_bytes("\n".join(rows).encode() + b"\n\xff\xfe\n")  # 11: not UTF-8
    records, problems = read_training_records(path)
    assert [r.md5 for r in records] == ["good1", "spaced id", "good2"]
    assert [r.line for r in records] == [1, 6, 10]
    assert records[0].to_json()["extra_key"] == 7
    assert records[2].bucket == (48, 16)
    found = {(p.line, p.reason) for p in problems}
    assert found == {
        (2, "malformed"),
        (3, "malformed"),
        (4, "malformed"),
        (5, "malformed"),
        (7, "malformed"),
        (8, "empty_caption"),
        (11, "malformed"),
    }
    by_line = {p.line: str(p) for p in problems}
    assert f"{path}:3" in by_line[3] and "'caption_en'" in by_line[3]
    assert "'bw'" in by_line[4] and "'bh'" in by_line[5]
    assert "not UTF-8" in by_line[11]


# ----------------------------------------------------------------------------- prepare


@pytest.fixture()
def messy_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    bright = {f"ok{i}": 150 + 10 * i for i in range(4)}
    dark = {f"dark{i}": 20 + i for i in range(3)}
    for md5, level in {**bright, **dark}.items():
        save_jpg(images / f"{md5}.jpg", np.clip(level + rng.normal(0, 3, (40, 56, 3)), 0, 255))
    (images / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    good = Image.new("RGB", (64, 64), (200, 200, 200))
    good.save(images / "truncated.jpg")
    data = (images / "truncated.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    save_jpg(images / "emptycap.jpg", np.full((32, 32, 3), 200))
    lines = [
        line("ok0"),  # 1
        line("dark0"),  # 2
        "{broken",  # 3
        line("ok1"),  # 4
        line("ghost"),  # 5 missing image
        line("corrupt"),  # 6
        line("emptycap", caption=""),  # 7
        line("dark1"),  # 8
        line("ok2"),  # 9
        line("truncated"),  # 10
        line("dark2"),  # 11
        line("ok3"),  # 12
    ]
    jsonl = tmp_path / "raw.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl, images


def mean_brightness(batch):
    return np.array([image.mean() / 255.0 for image in batch])


def test_prepare_report_counts_and_first_ids(messy_folder, tmp_path):
    jsonl, images = messy_folder
    out = tmp_path / "out" / "train.jsonl"
    calls = []

    def quality(batch):
        calls.append(len(batch))
        return mean_brightness(batch)

    report = prepare_dataset(jsonl, images, out, quality_fn=quality, threshold=0.5, batch_size=3)
    assert report["lines"] == 12 and report["kept"] == 4
    assert report["dropped"] == {
        "malformed": 1,
        "missing_image": 1,
        "unreadable_image": 2,
        "empty_caption": 1,
        "low_quality": 3,
    }
    first = {reason: [(e["line"], e["md5"]) for e in ex] for reason, ex in report["examples"].items()}
    assert first["malformed"] == [(3, None)]
    assert first["missing_image"] == [(5, "ghost")]
    assert first["unreadable_image"] == [(6, "corrupt"), (10, "truncated")]
    assert first["empty_caption"] == [(7, "emptycap")]
    assert first["low_quality"] == [(2, "dark0"), (8, "dark1"), (11, "dark2")]
    assert "raw.jsonl:3" in report["examples"]["malformed"][0]["message"]
    assert calls == [3, 3, 1]  # 7 readable images in batches of 3
    q = report["quality"]
    assert q["scored"] == 7 and q["min"] < 0.1 < 0.5 < q["max"]
    levels = [150, 160, 170, 180, 20, 21, 22]
    assert q["mean"] == pytest.approx(np.mean(levels) / 255, abs=0.01)
    kept = [json.loads(t) for t in out.read_text().splitlines()]
    assert [k["md5"] for k in kept] == ["ok0", "ok1", "ok2", "ok3"]
    assert kept[0] == json.loads(line("ok0"))


def test_prepare_raises_when_nothing_kept(messy_folder, tmp_path):
    jsonl, images = messy_folder
    out = tmp_path / "none.jsonl"
    with pytest.raises(ValueError, match="no usable record"):
        prepare_dataset(jsonl, images, out, quality_fn=mean_brightness, threshold=2.0)
    assert not out.exists()


def test_prepare_checks_quality_fn_output(messy_folder, tmp_path):
    jsonl, images = messy_folder
    with pytest.raises(ValueError, match="quality_fn returned shape"):
        prepare_dataset(jsonl, images, tmp_path / "o.jsonl", quality_fn=lambda b: [1.0], threshold=0.0)


# ----------------------------------------------------------------------------- dataset


def test_resize_center_crop_keeps_the_centre():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # white centre half of the width
    out = resize_center_crop(image, 20, 20)  # scale 0.5 -> 20x40, crop the middle 20 columns
    assert out.shape == (20, 20, 3)
    assert out[:, 2:-2].min() > 200


def test_dataset_crops_to_bucket_and_scales_pixels(tmp_path):
    save_jpg(tmp_path / "a.jpg", np.full((60, 100, 3), 255))
    save_jpg(tmp_path / "b.jpg", np.zeros((90, 30, 3)))
    rows = [line("a", "cap a", bw=48, bh=32), line("b", bw=16, bh=40)]
    (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n")
    records, problems = read_training_records(tmp_path / "t.jsonl")
    assert not problems
    dataset = ImageCaptionDataset(records, tmp_path)
    item = dataset[0]
    assert item["pixels"].shape == (3, 32, 48) and item["pixels"].dtype == torch.float32
    assert item["caption"] == "cap a" and item["md5"] == "a"
    assert torch.allclose(item["pixels"], torch.ones(1), atol=0.02)
    assert dataset[1]["pixels"].shape == (3, 40, 16)
    assert dataset[1]["pixels"].max() <= -0.98
    assert dataset.buckets == [(48, 32), (16, 40)]
    batch = collate([dataset[0], dataset[0]])
    assert batch["pixels"].shape == (2, 3, 32, 48) and batch["md5s"] == ["a", "a"]
    with pytest.raises(ValueError, match="mixes image shapes"):
        collate([dataset[0], dataset[1]])


def test_dataset_memory_keeps_crops_within_its_budget_and_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    for name in "abc":
        save_jpg(tmp_path / f"{name}.jpg", rng.integers(0, 256, (40, 40, 3)))
    (tmp_path / "t.jsonl").write_text("".join(line(n, bw=32, bh=32) + "\n" for n in "abc"))
    records = read_training_records(tmp_path / "t.jsonl")[0]
    plain = ImageCaptionDataset(records, tmp_path)
    kept = ImageCaptionDataset(records, tmp_path, memory_bytes=2 * 32 * 32 * 3)  # room for two crops
    expected = [plain[i]["pixels"] for i in range(3)]
    assert all(torch.equal(kept[i]["pixels"], expected[i]) for i in range(3))
    for name in "abc":
        (tmp_path / f"{name}.jpg").unlink()
    for i in (0, 1):  # kept: never read again, the same pixels, and a caller's write does not reach the copy kept
        item = kept[i]["pixels"]
        assert torch.equal(item, expected[i])
        item.zero_()
        assert torch.equal(kept[i]["pixels"], expected[i])
    with pytest.raises(ImageLoadError, match=r"c\.jpg"):  # over the budget: decoded on every access
        kept[2]
    with pytest.raises(ImageLoadError, match=r"a\.jpg"):  # no budget, nothing kept
        plain[0]


def test_dataset_missing_or_corrupt_file_raises_naming_it(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    (tmp_path / "t.jsonl").write_text(line("gone") + "\n" + line("bad") + "\n")
    dataset = ImageCaptionDataset(read_training_records(tmp_path / "t.jsonl")[0], tmp_path)
    with pytest.raises(ImageLoadError, match=r"gone\.jpg"):
        dataset[0]
    with pytest.raises(ImageLoadError, match=r"bad\.jpg"):
        dataset[1]


# ----------------------------------------------------------------------------- sampler

# 3 buckets: 23 + 17 + 10 samples, interleaved; batch 4 -> 5 + 4 + 2 = 11 full batches
BUCKETS = [(32, 32)] * 23 + [(48, 16)] * 17 + [(16, 48)] * 10
BUCKETS = [BUCKETS[i] for i in np.random.default_rng(1).permutation(len(BUCKETS))]


def sampler(**kw):
    return BucketBatchSampler(BUCKETS, 4, **{"seed": 7, **kw})


def test_sampler_single_bucket_full_batches():
    s = sampler()
    batches = list(s)
    assert len(batches) == len(s) == 11
    for batch in batches:
        assert len(batch) == 4 and len({BUCKETS[i] for i in batch}) == 1
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))


def test_sampler_mixes_buckets_across_the_epoch():
    s = sampler()
    changes = []
    for epoch in range(3):
        s.set_epoch(epoch)
        order = [BUCKETS[b[0]] for b in s]
        changes.append(sum(a != b for a, b in zip(order[:-1], order[1:], strict=True)))
    assert max(changes) > 2  # not just 3 contiguous runs of one bucket each


def test_sampler_ranks_are_disjoint_equal_and_cover_single_process():
    s1 = sampler(drop_last=True)
    full = s1.rank_batches(0)
    ranks = [sampler(rank=r, world_size=3) for r in range(3)]
    parts = [list(s) for s in ranks]
    assert [len(p) for p in parts] == [3, 3, 3] == [len(s) for s in ranks]
    sets = [{tuple(b) for b in p} for p in parts]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    # 11 batches cut to 9: the union is the single-process order minus its last 2 batches
    assert set().union(*sets) == {tuple(b) for b in full[:9]}
    halves = [list(sampler(rank=r, world_size=2)) for r in range(2)]
    assert sorted(map(tuple, halves[0] + halves[1])) == sorted(map(tuple, full[:10]))


def test_sampler_without_drop_last_keeps_tails_and_pads_ranks():
    s = sampler(drop_last=False)
    flat = sorted(i for b in s for i in b)
    assert flat == list(range(len(BUCKETS)))  # every sample once, tails kept (3+1+2)
    ranks = [list(sampler(drop_last=False, rank=r, world_size=4)) for r in range(4)]
    assert {len(p) for p in ranks} == {4}  # 14 batches padded to 16


def test_sampler_deterministic_and_epoch_dependent():
    a, b = sampler(), sampler()
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(sampler(seed=8)) != first


def test_sampler_start_batch_resumes_the_tail():
    s = sampler(rank=1, world_size=2)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start_batch=2)
    assert list(s) == full[2:] and len(s) == len(full) - 2
    assert s.locate(2 * s.batches_per_epoch + 3) == (2, 3)
    with pytest.raises(ValueError, match="start_batch"):
        s.set_epoch(0, start_batch=s.batches_per_epoch + 1)


def test_sampler_rejects_too_few_batches():
    with pytest.raises(ValueError, match="fewer than world_size"):
        BucketBatchSampler([(8, 8)] * 5, 4, seed=0, world_size=2)


def test_read_clean_records_refuses_malformed_lines(tmp_path):
    from soar.data.jsonl import read_clean_records

    path = tmp_path / "train.jsonl"
    path.write_text('{"md5": "a", "caption_en": "x", "bw": 8, "bh": 8}\n{"md5": "b", "caption_en": "y"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl: 1 malformed line\(s\), first: .*train.jsonl:2"):
        read_clean_records(path)
    path.write_text('{"md5": "a", "caption_en": "x", "bw": 8, "bh": 8}\n')
    assert [r.md5 for r in read_clean_records(path)] == ["a"]


def test_prepare_stops_at_a_bucket_the_model_cannot_take(messy_folder, tmp_path):
    jsonl, images = messy_folder
    lines = jsonl.read_text().splitlines()
    lines[8] = line("ok2", bw=40, bh=48)  # line 9: 40 is not a multiple of 16
    lines.append(line("ok3", bw=48, bh=20))  # line 13: 20 neither
    jsonl.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.jsonl"
    with pytest.raises(ValueError, match=r"raw\.jsonl:9: bucket 40x48 .* multiple of 16 px.*\(2 line"):
        prepare_dataset(jsonl, images, out, quality_fn=mean_brightness, threshold=0.5, bucket_multiple=16)
    assert not out.exists()
    report = prepare_dataset(jsonl, images, out, quality_fn=mean_brightness, threshold=0.5, bucket_multiple=4)
    assert report["kept"] == 5  # 40, 48 and 20 are multiples of 4


def test_pixel_multiple_reads_codec_factor_and_patch(tmp_path):
    from soar.models.geometry import pixel_multiple
    from soar.models.tiny import TinyModelConfig, write_tiny_model

    write_tiny_model(tmp_path / "tiny", TinyModelConfig(sample_size=16, patch_size=4, num_layers=1,
                                                        num_attention_heads=2, attention_head_dim=8,
                                                        joint_attention_dim=16, pooled_projection_dim=16,
                                                        caption_projection_dim=16, text_hidden_size=8,
                                                        text_layers=1, text_max_length=8), ["a"], seed=0)
    assert pixel_multiple(tmp_path / "tiny") == 4  # pixel codec (1) x patch 4
    vae = tmp_path / "sd" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    (tmp_path / "sd" / "transformer").mkdir()
    (tmp_path / "sd" / "transformer" / "config.json").write_text(json.dumps({"patch_size": 2}))
    assert pixel_multiple(tmp_path / "sd") == 16  # SD3.5: VAE factor 8 x patch 2
    with pytest.raises(FileNotFoundError, match=r"sd/vae has no vae/config\.json"):
        pixel_multiple(vae)


def test_training_stops_at_a_bucket_the_model_cannot_take(tmp_path):
    """A prepared JSONL edited by hand (prepare never saw it) fails before the first step, naming file:line."""
    from helpers import write_tiny_training_world

    from pipeline.config import MlflowConfig
    from pipeline.training import run_training
    from soar.models.bundle import load_bundle
    from soar.train_config import TrainConfig

    model_dir, image_dir, records = write_tiny_training_world(tmp_path)
    jsonl = tmp_path / "train.jsonl"
    rows = [{"md5": r.md5, "caption_en": r.caption, "bw": r.bw, "bh": r.bh} for r in records]
    rows[5]["bw"] = 18  # patch 4 x pixel codec 1: 18 is not a multiple of 4
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"train\.jsonl:6: bucket 18x16 .* multiple of 4 px"):
        run_training(load_bundle(model_dir), TrainConfig(max_train_steps=1), None, jsonl, image_dir, tmp_path / "out",
                     stage="train", method="sft", mlflow_cfg=MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db"),
                     params={})
    assert not (tmp_path / "out").exists()


# --- decoding: 16-bit, transparency, pixel budget, decompression bombs, duplicate md5s --------------------

def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    from soar.data.images import load_rgb

    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # Pillow reads it as 16-bit
    rgb = load_rgb(tmp_path / "deep.png")
    want = np.rint(values / 257.0).astype(np.uint8)
    assert rgb.shape == (48, 64, 3) and all(np.array_equal(rgb[..., c], want) for c in range(3))
    assert len(np.unique(rgb)) > 200  # a gradient, not black and white
    clipped = np.asarray(Image.open(tmp_path / "deep.png").convert("RGB"))  # what convert("RGB") gives:
    assert (clipped == 255).mean() > 0.99  # values above 255 clipped, almost all white


def test_transparency_is_composited_over_white(tmp_path):
    from soar.data.images import load_rgb

    palette = Image.new("P", (4, 2))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (made transparent), index 1 red
    palette.putdata([0, 1, 1, 0, 1, 0, 0, 1])
    palette.save(tmp_path / "pal.png", transparency=0)
    rgb = load_rgb(tmp_path / "pal.png")
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [255, 0, 0]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent (its colour must not show)
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black over white: grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    rgb = load_rgb(tmp_path / "alpha.png")
    assert rgb[0, 0].tolist() == [0, 0, 255] and rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == [127, 127, 127]


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_an_image_above_the_pixel_budget_is_downscaled_on_load(tmp_path, suffix):
    from soar.data.images import fit_budget, load_rgb

    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / f"big.{suffix}")
    rgb = load_rgb(tmp_path / f"big.{suffix}", max_pixels=100 * 75)
    assert rgb.shape == (75, 100, 3) and fit_budget(400, 300, 100 * 75) == (100, 75)  # aspect kept
    assert load_rgb(tmp_path / f"big.{suffix}").shape == (300, 400, 3)  # within the budget: untouched


def test_a_decompression_bomb_is_dropped_naming_the_file(messy_folder, tmp_path, monkeypatch):
    jsonl, images = messy_folder
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # ok* are 56 x 40 = 2240 px: above 2 x 500
    Image.new("RGB", (8, 8)).save(images / "small.jpg")
    jsonl.write_text(jsonl.read_text() + line("small") + "\n")
    report = prepare_dataset(jsonl, images, tmp_path / "o.jsonl", quality_fn=lambda b: np.ones(len(b)),
                             threshold=0.5)
    assert report["kept"] == 1 and report["dropped"]["unreadable_image"] == 9  # 7 too big, corrupt, truncated
    (first,) = [e for e in report["examples"]["unreadable_image"] if e["md5"] == "ok0"]
    assert "ok0.jpg" in first["message"] and "decompression-bomb limit" in first["message"]


def test_duplicate_md5s_are_kept_and_reported(messy_folder, tmp_path):
    jsonl, images = messy_folder
    jsonl.write_text(jsonl.read_text() + line("ok1", caption="another caption") + "\n" + line("ok1") + "\n")
    report = prepare_dataset(jsonl, images, tmp_path / "o.jsonl", quality_fn=mean_brightness, threshold=0.5)
    assert report["kept"] == 6  # the 4 bright ones and both repeats of ok1
    assert report["duplicate_md5"] == {"lines": 2, "examples": [{"line": 13, "md5": "ok1", "first_line": 4},
                                                                {"line": 14, "md5": "ok1", "first_line": 4}]}


def test_a_batch_larger_than_every_bucket_names_the_key():
    from soar.data.dataset import unusable_buckets

    buckets = [(32, 32)] * 5 + [(48, 16)] * 3 + [(16, 48)] * 9
    assert unusable_buckets(buckets, 4, 1) == {(48, 16): 3}  # never drawn with drop_last batching
    assert unusable_buckets(buckets, 3, 2) == {}
    with pytest.raises(ValueError, match=r"train\.train_batch_size is 10 but the largest bucket holds 9 image\(s\) "
                                         r"\(17 in 3 bucket\(s\)\): 0 full batch\(es\) for 1 process\(es\); lower "
                                         r"train\.train_batch_size to at most 9"):
        unusable_buckets(buckets, 10, 1)
    with pytest.raises(ValueError, match=r"pretrain\.train_batch_size is 5 .* 2 full batch\(es\) for 4 process"):
        unusable_buckets(buckets, 5, 4, "pretrain.train_batch_size")


def test_a_side_that_is_no_multiple_names_the_key_and_the_nearest_sides():
    from soar.models.geometry import check_side

    check_side(512, 16, "sample.resolution", "sd35")
    with pytest.raises(ValueError, match=r"sample\.resolution is 500 px, not a multiple of 16 px \(codec factor x "
                                         r"patch size of sd35\); use 496 or 512"):
        check_side(500, 16, "sample.resolution", "sd35")
