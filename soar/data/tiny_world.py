"""The tiny world: a synthetic captioned dataset a tiny text-to-image model learns on a CPU in minutes.

Images are ``image_size`` squares on a light-gray background holding solid shapes (GenEval
"classes" ``circle``, ``square``, ``triangle`` in six GenEval colours), or one short black word.
Every shape caption is a GenEval prompt of one of the six tags (``single_object``, ``two_object``,
``counting``, ``colors``, ``position``, ``color_attr``) built exactly like the official prompt list,
or, for training, the same prompt with the rendered colours spelled out ("a photo of three red
triangles"), so the model learns colours from most captions. Text captions follow the Flow-GRPO
OCR format: ``a sign that says "CAT"``. A fraction of training images is strongly degraded (blur
and/or noise) for the quality filter to remove (see ``soar.data.quality``).

``generate_world`` writes the HY-SOAR training layout (``train.jsonl`` + ``images/{md5}.jpg``) and the
held-out prompt sets ``eval/geneval/metadata.jsonl`` and ``eval/ocr/prompts.txt``, and held-out
captioned images ``eval/heldout/heldout.jsonl`` + ``eval/heldout/images/`` (clean, never in training; the
exposure-bias meter's data path). Output bytes are a
function of the arguments only: every image draws from its own ``numpy`` generator seeded by
``(seed, stream, index)``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from soar.data.tiny_render import (
    PALETTE,
    SHAPES,
    SceneObject,
    degrade,
    encode_jpeg,
    place_objects,
    render_scene,
    render_text,
)
from soar.rewards.geneval_rules import RELATIONS, TAGS, relative_position

COLORS = tuple(PALETTE)
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}  # GenEval counts (one object is single_object)
# Eight short words: at 32 px a 2-3 letter word is drawn with glyphs ~10 px tall, and with ~100 training signs per
# word a tiny model can learn to write them (28 words of up to 4 letters left every tiny model at OCR 0).
WORDS = ("HI", "OK", "GO", "UP", "NO", "CAT", "SUN", "RED")
TEXT_TEMPLATE = 'a sign that says "{word}"'
COLORIZE_PROB = 0.5  # training captions of uncoloured tags that spell out the rendered colours
# independent random streams (seed, stream, index)
TRAIN_STREAM, SELECT_STREAM, GENEVAL_STREAM, OCR_STREAM, HELDOUT_STREAM, GRPO_STREAM = 1, 2, 3, 4, 5, 6
MAX_DUPLICATE_RETRIES = 20
RELATION_JITTER = (-1.0, 0.0, 1.0)  # pixels; a position layout must hold under these box shifts


def _pick(rng: np.random.Generator, options, k: int = 1) -> list:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def sample_metadata(tag: str, rng: np.random.Generator) -> dict[str, Any]:
    """A GenEval metadata line of ``tag`` over the tiny world's classes and colours."""
    if tag == "single_object":
        (c,) = _pick(rng, SHAPES)
        return {"tag": tag, "include": [{"class": c, "count": 1}], "prompt": f"a photo of a {c}"}
    if tag == "two_object":
        a, b = _pick(rng, SHAPES, 2)
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        return {"tag": tag, "include": include, "prompt": f"a photo of a {a} and a {b}"}
    if tag == "counting":
        (c,) = _pick(rng, SHAPES)
        n = int(rng.choice(list(NUMBER_WORDS)))
        return {"tag": tag, "include": [{"class": c, "count": n}], "exclude": [{"class": c, "count": n + 1}],
                "prompt": f"a photo of {NUMBER_WORDS[n]} {PLURALS[c]}"}
    if tag == "colors":
        (c,), (col,) = _pick(rng, SHAPES), _pick(rng, COLORS)
        return {"tag": tag, "include": [{"class": c, "count": 1, "color": col}],
                "prompt": f"a photo of a {col} {c}"}
    if tag == "position":
        target, obj = _pick(rng, SHAPES, 2)
        (rel,) = _pick(rng, RELATIONS)
        include = [{"class": target, "count": 1}, {"class": obj, "count": 1, "position": [rel, 0]}]
        return {"tag": tag, "include": include, "prompt": f"a photo of a {obj} {rel} a {target}"}
    if tag == "color_attr":
        (a, b), (ca, cb) = _pick(rng, SHAPES, 2), _pick(rng, COLORS, 2)
        include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        return {"tag": tag, "include": include, "prompt": f"a photo of a {ca} {a} and a {cb} {b}"}
    raise ValueError(f"unknown GenEval tag {tag!r}; known: {TAGS}")


def _relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """``relation`` of a to b under GenEval's rule, robustly (also with boxes shifted by a pixel)."""
    for sx in RELATION_JITTER:
        for sy in RELATION_JITTER:
            box = (a.box[0] + sx, a.box[1] + sy, a.box[2] + sx, a.box[3] + sy)
            if relation not in relative_position(box, b.box):
                return False
    return True


def scene_for_metadata(
    metadata: dict[str, Any], image_size: int, rng: np.random.Generator, *, same_color: bool = False
) -> list[SceneObject]:
    """Objects that satisfy ``metadata`` (random colours where it names none), placed without overlap.

    ``same_color``: a counting scene's objects share one colour (for captions that name it).
    """
    items: list[tuple[str, str]] = []
    shared = _pick(rng, COLORS)[0]
    for req in metadata["include"]:
        for _ in range(req["count"]):
            color = req.get("color") or (shared if same_color else _pick(rng, COLORS)[0])
            items.append((req["class"], color))
    accept = None
    relations = [(i, req["position"]) for i, req in enumerate(metadata["include"]) if "position" in req]
    if relations:
        if any(r["count"] != 1 for r in metadata["include"]):
            raise ValueError(f"position layouts need count 1 per clause: {metadata['prompt']!r}")

        def accept(objects: list[SceneObject]) -> bool:
            return all(_relation_holds(objects[i], objects[j], rel) for i, (rel, j) in relations)

    return place_objects(items, image_size, rng, accept=accept)


def caption_for(metadata: dict[str, Any], objects: list[SceneObject], *, colorize: bool) -> str:
    """The metadata's prompt, or with ``colorize`` the same sentence naming the rendered colours."""
    if not colorize or metadata["tag"] in ("colors", "color_attr"):
        return str(metadata["prompt"])
    inc = metadata["include"]
    first = {o.shape: o.color for o in reversed(objects)}  # the colour of each class's first object
    if metadata["tag"] == "counting":
        c = inc[0]["class"]
        return f"a photo of {NUMBER_WORDS[inc[0]['count']]} {first[c]} {PLURALS[c]}"
    if metadata["tag"] == "single_object":
        return f"a photo of a {first[inc[0]['class']]} {inc[0]['class']}"
    if metadata["tag"] == "two_object":
        a, b = inc[0]["class"], inc[1]["class"]
        return f"a photo of a {first[a]} {a} and a {first[b]} {b}"
    target, obj = inc[0]["class"], inc[1]["class"]
    return f"a photo of a {first[obj]} {obj} {inc[1]['position'][0]} a {first[target]} {target}"


_COL = "(?:(" + "|".join(COLORS) + ") )?"
_CLS = "(" + "|".join(SHAPES) + ")"
_CAPTION_PATTERNS = (
    ("count", re.compile(rf"a photo of ({'|'.join(NUMBER_WORDS.values())}) {_COL}({'|'.join(PLURALS.values())})")),
    ("position", re.compile(rf"a photo of a {_COL}{_CLS} ({'|'.join(RELATIONS)}) a {_COL}{_CLS}")),
    ("two", re.compile(rf"a photo of a {_COL}{_CLS} and a {_COL}{_CLS}")),
    ("one", re.compile(rf"a photo of a {_COL}{_CLS}")),
)


def parse_caption(caption: str) -> dict[str, Any] | None:
    """GenEval metadata (colours included when named) for a tiny-world shape caption; None otherwise."""
    for kind, pattern in _CAPTION_PATTERNS:
        m = pattern.fullmatch(caption)
        if not m:
            continue
        g = m.groups()

        def req(color: str | None, cls: str, count: int = 1) -> dict[str, Any]:
            return {"class": cls, "count": count, **({"color": color} if color else {})}

        if kind == "count":
            n = {w: k for k, w in NUMBER_WORDS.items()}[g[0]]
            cls = {p: s for s, p in PLURALS.items()}[g[2]]
            return {"tag": "counting", "include": [req(g[1], cls, n)], "exclude": [{"class": cls, "count": n + 1}],
                    "prompt": caption}
        if kind == "position":
            include = [req(g[3], g[4]), {**req(g[0], g[1]), "position": [g[2], 0]}]
            return {"tag": "position", "include": include, "prompt": caption}
        if kind == "two":
            tag = "color_attr" if g[0] and g[2] else "two_object"
            return {"tag": tag, "include": [req(g[0], g[1]), req(g[2], g[3])], "prompt": caption}
        return {"tag": "colors" if g[0] else "single_object", "include": [req(g[0], g[1])], "prompt": caption}
    return None


def _train_example(index: int, kind: str, degraded: bool, image_size: int, seed: int, attempt: int,
                   stream: int = TRAIN_STREAM):
    rng = np.random.default_rng([seed, stream, index, attempt])
    if kind == "text":
        word = _pick(rng, WORDS)[0]
        image, caption = render_text(word, image_size, rng), TEXT_TEMPLATE.format(word=word)
    else:
        metadata = sample_metadata(kind, rng)
        colorize = bool(rng.random() < COLORIZE_PROB)
        objects = scene_for_metadata(metadata, image_size, rng, same_color=colorize)
        image, caption = render_scene(objects, image_size), caption_for(metadata, objects, colorize=colorize)
    mode = None
    if degraded:
        image, mode = degrade(image, rng)
    return encode_jpeg(image), caption, mode


def _write_examples(jsonl: Path, image_dir: Path, kinds: list[str], degraded: np.ndarray, image_size: int,
                    seed: int, stream: int, seen: set[str]) -> tuple[Counter, Counter]:
    """Render example i of ``kinds[i]`` from stream ``stream``, write ``image_dir/{md5}.jpg`` and its JSONL line.

    A render equal to an earlier one (``seen``: md5s written so far, training ones included) is redrawn.
    Returns the counts per kind and per degradation mode.
    """
    image_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    with jsonl.open("w", encoding="utf-8") as f:
        for i, kind in enumerate(kinds):
            for attempt in range(MAX_DUPLICATE_RETRIES):
                data, caption, mode = _train_example(i, kind, bool(degraded[i]), image_size, seed, attempt, stream)
                md5 = hashlib.md5(data).hexdigest()
                if md5 not in seen:
                    break
            else:
                raise RuntimeError(f"{jsonl.name} image {i}: {MAX_DUPLICATE_RETRIES} renders all repeat earlier images")
            seen.add(md5)
            (image_dir / f"{md5}.jpg").write_bytes(data)
            f.write(json.dumps({"md5": md5, "caption_en": caption, "bw": image_size, "bh": image_size}) + "\n")
            counts[kind] += 1
            if mode:
                modes[mode] += 1
    return counts, modes


def _write_metadata(path: Path, count: int, seed: int, stream: int) -> Counter[str]:
    """``count`` GenEval metadata lines, the tags in turn, line i drawn from (seed, stream, i); returns tag counts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tags: Counter[str] = Counter()
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            tag = TAGS[i % len(TAGS)]
            f.write(json.dumps(sample_metadata(tag, np.random.default_rng([seed, stream, i]))) + "\n")
            tags[tag] += 1
    return tags


def generate_world(
    out_dir: Path,
    *,
    num_images: int,
    image_size: int = 64,
    degraded_fraction: float = 0.2,
    text_fraction: float = 0.2,
    num_eval_geneval: int = 120,
    num_eval_ocr: int = 60,
    num_heldout: int = 0,
    num_grpo_prompts: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the tiny world under ``out_dir`` and return a summary (counts per kind, degraded count)."""
    for name, frac in (("degraded_fraction", degraded_fraction), ("text_fraction", text_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"generate_world: {name} must be in [0, 1], got {frac}")
    if min(num_images, num_eval_geneval, num_eval_ocr, num_heldout, num_grpo_prompts) < 0 or image_size < 16:
        raise ValueError(f"generate_world: bad sizes num_images={num_images}, image_size={image_size}, "
                         f"num_eval_geneval={num_eval_geneval}, num_eval_ocr={num_eval_ocr}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    select = np.random.default_rng([seed, SELECT_STREAM])
    is_text = np.zeros(num_images, dtype=bool)
    is_text[select.permutation(num_images)[: round(text_fraction * num_images)]] = True
    is_degraded = np.zeros(num_images, dtype=bool)
    is_degraded[select.permutation(num_images)[: round(degraded_fraction * num_images)]] = True
    shape_kinds = select.integers(len(TAGS), size=num_images)

    seen: set[str] = set()
    train_kinds = ["text" if is_text[i] else TAGS[shape_kinds[i]] for i in range(num_images)]
    kinds, modes = _write_examples(out_dir / "train.jsonl", image_dir, train_kinds, is_degraded, image_size, seed,
                                   TRAIN_STREAM, seen)
    # held-out images (clean, same mix of kinds, own stream, never a training image): the exposure-bias meter's data
    heldout_dir = out_dir / "eval" / "heldout"
    held = np.random.default_rng([seed, HELDOUT_STREAM])
    held_kinds = ["text" if held.random() < text_fraction else TAGS[held.integers(len(TAGS))]
                  for _ in range(num_heldout)]
    _write_examples(heldout_dir / "heldout.jsonl", heldout_dir / "images", held_kinds,
                    np.zeros(num_heldout, dtype=bool), image_size, seed, HELDOUT_STREAM, seen)
    for folder in (image_dir, heldout_dir / "images"):
        for stale in folder.glob("*.jpg"):  # left over from an earlier run with other arguments
            if stale.stem not in seen:
                stale.unlink()

    geneval_dir, ocr_dir = out_dir / "eval" / "geneval", out_dir / "eval" / "ocr"
    geneval_dir.mkdir(parents=True, exist_ok=True)
    ocr_dir.mkdir(parents=True, exist_ok=True)
    eval_tags = _write_metadata(geneval_dir / "metadata.jsonl", num_eval_geneval, seed, GENEVAL_STREAM)
    # GRPO's training prompts: the same tags and templates from their own stream (the tiny space of prompts makes
    # some equal to evaluation prompts, as the training captions are)
    _write_metadata(out_dir / "grpo" / "metadata.jsonl", num_grpo_prompts, seed, GRPO_STREAM)
    with (ocr_dir / "prompts.txt").open("w", encoding="utf-8") as f:
        for i in range(num_eval_ocr):
            word = _pick(np.random.default_rng([seed, OCR_STREAM, i]), WORDS)[0]
            f.write(TEXT_TEMPLATE.format(word=word) + "\n")
    return {
        "num_images": num_images,
        "image_size": image_size,
        "per_kind": dict(sorted(kinds.items())),
        "degraded": int(is_degraded.sum()),
        "degraded_by_mode": dict(sorted(modes.items())),
        "num_eval_geneval": num_eval_geneval,
        "eval_geneval_per_tag": dict(sorted(eval_tags.items())),
        "num_eval_ocr": num_eval_ocr,
        "num_heldout": num_heldout,
        "num_grpo_prompts": num_grpo_prompts,
        "seed": seed,
    }
