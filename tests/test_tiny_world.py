"""The tiny world: determinism, file formats, captions that match the pixels, quality, detector, scorer."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import read_params
from soar.data.quality import image_quality
from soar.data.tiny_render import (
    BACKGROUND_RGB,
    DEGRADATION_MODES,
    PALETTE,
    SUPERSAMPLE,
    degrade,
    encode_jpeg,
    render_scene,
    render_text,
)
from soar.data.tiny_world import (
    TAGS,
    WORDS,
    generate_world,
    parse_caption,
    sample_metadata,
    scene_for_metadata,
)
from soar.rewards import build_scorer
from soar.rewards.geneval import GenEvalScorer
from soar.rewards.geneval_rules import evaluate, load_metadata_jsonl
from soar.rewards.tiny_detector import TinyDetector

QUALITY_THRESHOLD = read_params(Path(__file__).resolve().parents[1] / "params.yaml")["data"]["quality_threshold"]
ARGS = {"num_images": 60, "image_size": 64, "degraded_fraction": 0.25, "text_fraction": 0.2,
        "num_eval_geneval": 24, "num_eval_ocr": 10, "num_heldout": 16, "seed": 3}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jpeg(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encode_jpeg(image))).convert("RGB"))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, generate_world(out, **ARGS)


def test_deterministic_and_seed_sensitive(world, tmp_path):
    out, summary = world
    assert generate_world(tmp_path / "again", **ARGS) == summary
    assert _files(tmp_path / "again") == _files(out)
    other = generate_world(tmp_path / "other", **{**ARGS, "seed": 4})
    assert other["num_images"] == summary["num_images"]
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()


def test_heldout_images_are_clean_and_never_trained_on(world):
    out, summary = world
    held = _lines(out / "eval" / "heldout" / "heldout.jsonl")
    train = {r["md5"] for r in _lines(out / "train.jsonl")}
    assert len(held) == ARGS["num_heldout"] == summary["num_heldout"]
    assert len({r["md5"] for r in held}) == len(held) and not train & {r["md5"] for r in held}
    files = sorted((out / "eval" / "heldout" / "images").glob("*.jpg"))
    assert [p.stem for p in files] == sorted(r["md5"] for r in held)
    for row in held:
        data = (out / "eval" / "heldout" / "images" / f"{row['md5']}.jpg").read_bytes()
        assert hashlib.md5(data).hexdigest() == row["md5"]
    assert any(r["caption_en"].startswith("a sign") for r in held) or ARGS["text_fraction"] * len(held) < 2
    assert any(r["caption_en"].startswith("a photo") for r in held)


def test_train_format_and_md5(world):
    out, summary = world
    rows = _lines(out / "train.jsonl")
    assert len(rows) == ARGS["num_images"] == len(list((out / "images").glob("*.jpg")))
    for row in rows:
        assert set(row) == {"md5", "caption_en", "bw", "bh"}
        data = (out / "images" / f"{row['md5']}.jpg").read_bytes()
        assert hashlib.md5(data).hexdigest() == row["md5"]
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.size == (row["bw"], row["bh"]) == (64, 64)
    assert summary["degraded"] == round(ARGS["degraded_fraction"] * ARGS["num_images"])
    assert summary["per_kind"]["text"] == round(ARGS["text_fraction"] * ARGS["num_images"])
    assert sum(summary["per_kind"].values()) == ARGS["num_images"]
    texts = [r["caption_en"] for r in rows if r["caption_en"].startswith("a sign")]
    assert len(texts) == summary["per_kind"]["text"]


def test_eval_sets_parse_and_match_geneval_phrasing(world):
    out, summary = world
    lines = load_metadata_jsonl(out / "eval" / "geneval" / "metadata.jsonl")
    assert len(lines) == ARGS["num_eval_geneval"]
    assert summary["eval_geneval_per_tag"] == {t: ARGS["num_eval_geneval"] // 6 for t in TAGS}
    for m in lines:
        assert list(m) == ["tag", "include", "exclude", "prompt"] if "exclude" in m else ["tag", "include", "prompt"]
        assert parse_caption(m["prompt"]) == m  # the prompt says exactly what the metadata asks
        if m["tag"] == "counting":
            assert m["exclude"] == [{"class": m["include"][0]["class"], "count": m["include"][0]["count"] + 1}]
        if m["tag"] == "position":
            rel = m["include"][1]["position"][0]
            assert m["prompt"] == f"a photo of a {m['include'][1]['class']} {rel} a {m['include'][0]['class']}"
    prompts = (out / "eval" / "ocr" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == ARGS["num_eval_ocr"]
    for p in prompts:
        assert re.fullmatch(r'a sign that says "([A-Z]+)"', p) and p.split('"')[1] in WORDS


def test_clean_training_captions_match_the_pixels(tmp_path):
    """Detector + rules engine on every clean training image, against its own caption: all correct."""
    out = tmp_path / "clean"
    generate_world(out, **{**ARGS, "num_images": 120, "degraded_fraction": 0.0})
    detector, checked, colored = TinyDetector(64), 0, 0
    for row in _lines(out / "train.jsonl"):
        meta = parse_caption(row["caption_en"])
        if meta is None:
            assert re.fullmatch(r'a sign that says "[A-Z]+"', row["caption_en"])
            continue
        image = np.asarray(Image.open(out / "images" / f"{row['md5']}.jpg").convert("RGB"))
        correct, strict, reason = evaluate(meta, detector.detect(image))
        assert correct and strict, f"{row['caption_en']!r}: {reason}"
        checked += 1
        colored += any("color" in r for r in meta["include"])
    assert checked >= 80 and colored > checked / 2  # most captions name colours


def test_eval_style_scenes_are_judged_correct_and_wrong_ones_not():
    detector = TinyDetector(64)
    for i in range(120):
        rng = np.random.default_rng([11, i])
        meta = sample_metadata(TAGS[i % len(TAGS)], rng)
        image = _jpeg(render_scene(scene_for_metadata(meta, 64, rng), 64))
        correct, strict, reason = evaluate(meta, detector.detect(image))
        assert correct and strict, f"{meta['prompt']!r}: {reason}"
        blank = np.full_like(image, BACKGROUND_RGB)
        assert not evaluate(meta, detector.detect(blank))[0]


def test_detector_recovers_class_colour_and_box():
    rng = np.random.default_rng(0)
    meta = {"tag": "color_attr", "prompt": "p", "include": [{"class": "triangle", "count": 1, "color": "yellow"},
                                                            {"class": "circle", "count": 1, "color": "purple"}]}
    objects = scene_for_metadata(meta, 64, rng)
    found = TinyDetector(64).detect(_jpeg(render_scene(objects, 64)))
    assert sorted((d.label, d.color) for d in found) == [("circle", "purple"), ("triangle", "yellow")]
    for obj in objects:
        (d,) = [d for d in found if d.label == obj.shape]
        assert d.score >= 0.95
        assert np.abs(np.subtract(d.box, obj.box)).max() < 1.0


def test_detector_gives_blobs_and_text_low_confidence():
    big = 64 * SUPERSAMPLE
    from PIL import ImageDraw

    canvas = Image.new("RGB", (big, big), BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((20, 40, 220, 120), fill=PALETTE["red"])  # 2.5:1 ellipse
    draw.ellipse((20, 150, 100, 230), fill=PALETTE["blue"])  # two touching blue discs
    draw.ellipse((100, 150, 180, 230), fill=PALETTE["blue"])
    image = np.asarray(canvas.resize((64, 64), Image.Resampling.BOX))
    assert all(d.score < 0.5 for d in TinyDetector(64).detect(image))
    rng = np.random.default_rng(1)
    for word in WORDS[:12]:
        assert all(d.score <= 0.3 for d in TinyDetector(64).detect(_jpeg(render_text(word, 64, rng))))


def test_quality_separates_clean_from_degraded():
    clean, degraded, modes = [], [], set()
    for i in range(90):
        rng = np.random.default_rng([5, i])
        if i % 3 == 0:
            image = render_text(WORDS[i % len(WORDS)], 64, rng)
        else:
            image = render_scene(scene_for_metadata(sample_metadata(TAGS[i % 6], rng), 64, rng), 64)
        bad, mode = degrade(image, rng)
        modes.add(mode)
        clean.append(image_quality(_jpeg(image)))
        degraded.append(image_quality(_jpeg(bad)))
    assert modes == set(DEGRADATION_MODES)
    assert min(clean) >= QUALITY_THRESHOLD + 3, min(clean)
    assert max(degraded) < QUALITY_THRESHOLD - 3, max(degraded)
    assert 0.0 <= min(degraded) and max(clean) <= 10.0


def test_world_degraded_images_are_exactly_the_low_quality_ones(world, tmp_path):
    """Same arguments without degradation give the same lines; exactly the changed ones score low."""
    out, summary = world
    generate_world(tmp_path / "nodeg", **{**ARGS, "degraded_fraction": 0.0})
    rows, clean_rows = _lines(out / "train.jsonl"), _lines(tmp_path / "nodeg" / "train.jsonl")
    assert [r["caption_en"] for r in rows] == [r["caption_en"] for r in clean_rows]
    changed = [a["md5"] != b["md5"] for a, b in zip(rows, clean_rows, strict=True)]
    low = [image_quality(np.asarray(Image.open(out / "images" / f"{r['md5']}.jpg").convert("RGB")))
           < QUALITY_THRESHOLD for r in rows]
    assert low == changed and sum(low) == summary["degraded"]


def test_geneval_scorer_scores_and_task_averages():
    import soar.rewards.geneval  # noqa: F401  (registers "geneval")

    metas, images = [], []
    for i in range(12):
        rng = np.random.default_rng([21, i])
        meta = sample_metadata(TAGS[i % 6], rng)
        metas.append(meta)
        images.append(_jpeg(render_scene(scene_for_metadata(meta, 64, rng), 64)))
    images[2] = np.full_like(images[2], BACKGROUND_RGB)  # one counting image fails
    scorer = build_scorer("geneval", backend="tiny")
    assert isinstance(scorer, GenEvalScorer)
    records = scorer.score(np.stack(images), [m["prompt"] for m in metas], metas)
    assert [r.score for r in records] == [0.0 if i == 2 else 1.0 for i in range(12)]
    assert records[2].details["tag"] == "counting" and records[2].details["reason"].startswith("expected")
    agg = scorer.aggregate(records)
    assert agg["geneval/counting"] == 0.5 and agg["geneval"] == pytest.approx(11 / 12)  # 5 tags at 1, one at 0.5
    # larger renders of the same world are resized to the detector's side
    big = np.asarray(Image.fromarray(images[0]).resize((128, 128), Image.Resampling.NEAREST))
    assert scorer.score(big[None], [metas[0]["prompt"]], [metas[0]])[0].score == 1.0
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.mask2former"):
        build_scorer("geneval", backend="mask2former")
    with pytest.raises(ValueError, match="differs"):
        scorer.score(np.stack(images[:1]), ["a photo of a dog"], metas[:1])
