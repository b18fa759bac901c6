"""The mask2former GenEval backend: its pieces on hand-built inputs, and the scorer on tiny random models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from soar.models.tiny import build_clip_tokenizer
from soar.rewards import build_scorer, geneval_m2f
from soar.rewards.clip_scores import load_clip
from soar.rewards.geneval_m2f import (
    COLOR_AUTOCAST_DTYPES,
    GENEVAL_CLASSES,
    ColorClassifier,
    autocast_context,
    crop_on_background,
    geneval_class_names,
    mask_boxes,
    postprocess_instances,
    resolve_autocast,
    scaled_size,
    to_detections,
)
from soar.rewards.geneval_rules import evaluate, keep_detections
from soar.rewards.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_transform

HF_NAMES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}  # Detectron2/HF
HF_ID2LABEL = {i: HF_NAMES.get(n, n) for i, n in enumerate(GENEVAL_CLASSES)}
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny random Mask2Former (COCO id2label, HF names) and CLIP (+ BPE tokenizer) folders."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    root = tmp_path_factory.mktemp("geneval_m2f")
    torch.manual_seed(0)
    swin = SwinConfig(image_size=64, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=12, id2label=HF_ID2LABEL)
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():  # confident classes and sharp masks, so that some instances pass 0.3
        model.class_predictor.weight.mul_(30.0)
        model.get_parameter("model.transformer_module.decoder.mask_predictor.mask_embedder.2.0.weight").mul_(30.0)
    model.save_pretrained(root / "m2f")
    Mask2FormerImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(root / "m2f")

    words = COLORS + ["a", "photo", "of", "colored", "object"] + " ".join(GENEVAL_CLASSES).split()
    tokenizer = build_clip_tokenizer(sorted(set(words)), max_length=77)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    clip_config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, **ids},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(clip_config).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    return {"mask2former": str(root / "m2f"), "clip_vit_l14": str(root / "clip")}


@pytest.fixture(scope="module")
def scorer(checkpoints):
    return build_scorer("geneval", backend="mask2former", checkpoints=checkpoints)


def _images(n: int, seed: int = 0, side: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((n, side, side, 3), np.uint8)
    for i in range(n):
        out[i] = rng.integers(0, 256, 3)
        for _ in range(2):
            y, x = rng.integers(0, side - side // 3, 2)
            out[i, y:y + side // 3, x:x + side // 3] = rng.integers(0, 256, 3)
    return out


def test_class_names_are_geneval_order_and_complete():
    assert geneval_class_names(HF_ID2LABEL) == GENEVAL_CLASSES
    assert len(set(GENEVAL_CLASSES)) == 80
    # spot checks of object_names.txt (mmdet's COCO order, GenEval's renames); the whole list: the test below
    assert GENEVAL_CLASSES[:5] == ("person", "bicycle", "car", "motorcycle", "airplane")
    assert GENEVAL_CLASSES[62:67] == ("tv", "laptop", "computer mouse", "tv remote", "computer keyboard")
    assert GENEVAL_CLASSES[-1] == "toothbrush"
    other = {**HF_ID2LABEL, 3: "motorbike", 4: "aeroplane", 57: "sofa", 60: "diningtable", 62: "tvmonitor"}
    assert geneval_class_names({str(k): v for k, v in other.items()}) == GENEVAL_CLASSES
    with pytest.raises(ValueError, match="LABEL_0"):
        geneval_class_names({i: f"LABEL_{i}" for i in range(80)})
    with pytest.raises(ValueError, match="80 COCO"):
        geneval_class_names({**HF_ID2LABEL, 1: "person"})  # duplicate
    with pytest.raises(ValueError, match="80 COCO"):
        geneval_class_names({i: n for i, n in HF_ID2LABEL.items() if i < 79})


@pytest.mark.public_data
def test_class_names_are_the_official_object_names(public_prompt_files):
    text = (public_prompt_files / "geneval" / "object_names.txt").read_text()
    assert tuple(line.strip() for line in text.splitlines() if line.strip()) == GENEVAL_CLASSES


def test_scaled_size_is_mmdet_test_scale():
    assert scaled_size(512, 512) == (800, 800)
    assert scaled_size(48, 64) == (800, 1067)  # mmcv rounds half up (HF's helper would give 1066)
    assert scaled_size(100, 400) == (333, 1333)  # long side capped at 1333


def test_mask_boxes_are_mask_extent_plus_one():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 11] = True
    boxes = mask_boxes(masks)
    assert boxes.tolist() == [[3.0, 2.0, 9.0, 5.0], [11.0, 7.0, 12.0, 8.0], [0.0, 0.0, 0.0, 0.0]]


def test_instances_match_transformers_postprocess_at_384():
    """Scores and masks equal HF's ``post_process_instance_segmentation`` where both apply (unpadded 384 px)."""
    from transformers import Mask2FormerImageProcessor

    class Out:
        pass

    g = torch.Generator().manual_seed(1)
    out = Out()
    out.class_queries_logits = torch.randn(1, 100, 81, generator=g) * 3
    out.masks_queries_logits = torch.randn(1, 100, 24, 24, generator=g) * 2
    ref = Mask2FormerImageProcessor().post_process_instance_segmentation(out, threshold=0.0, return_binary_maps=True)[0]
    labels, scores, masks = postprocess_instances(out.class_queries_logits[0], out.masks_queries_logits[0],
                                                  (384, 384), (384, 384), (384, 384), min_score=0.0)
    ours = sorted(zip(labels.tolist(), scores.tolist(), masks, strict=True), key=lambda t: (t[0], t[1]))
    info = ref["segments_info"]
    theirs = sorted(zip([s["label_id"] for s in info], [s["score"] for s in info], ref["segmentation"].bool(),
                        strict=True), key=lambda t: (t[0], t[1]))
    assert len(ours) == len(theirs) == 100
    for (la, sa, ma), (lb, sb, mb) in zip(ours, theirs, strict=True):
        assert la == lb and sa == pytest.approx(sb, abs=1e-6) and torch.equal(ma, mb)


def test_instances_crop_padding_then_resize_to_the_image():
    """Logits over a padded 64x64 input of which 48x64 is the image; the original is 24x32."""
    class_logits = torch.full((2, 81), -20.0)
    class_logits[0, 16] = 20.0  # query 0: dog
    class_logits[1, 80] = 20.0  # query 1: no object
    mask_logits = torch.full((2, 16, 16), -10.0)
    mask_logits[:, 0:6, 8:16] = 10.0  # padded rows 0..23, columns 32..63
    labels, scores, masks = postprocess_instances(class_logits, mask_logits, (64, 64), (48, 64), (24, 32))
    assert labels.tolist() == [16] and masks.shape == (1, 24, 32)
    assert mask_boxes(masks).tolist() == [[16.0, 0.0, 32.0, 12.0]]  # cropping first keeps the rows at 1/2
    assert 0.95 < float(scores[0]) <= 1.0
    # a prob of 0.3 or less never passes; nor does an empty mask
    weak = torch.full((1, 81), 0.0)
    assert len(postprocess_instances(weak, mask_logits[:1], (64, 64), (48, 64), (24, 32))[0]) == 0
    empty = postprocess_instances(class_logits[:1], torch.full((1, 16, 16), -10.0), (64, 64), (48, 64), (24, 32))
    assert len(empty[0]) == 0 and empty[2].shape == (0, 24, 32)


def _instance_set(spec: list[tuple[int, float]], side: int = 40):
    """Class ids, scores and one 4x4-pixel mask per instance, on a grid of 9 per row."""
    masks = torch.zeros(len(spec), side, side, dtype=torch.bool)
    for k in range(len(spec)):
        y, x = 4 * (k // 9), 4 * (k % 9)
        masks[k, y:y + 4, x:x + 4] = True
    return torch.tensor([c for c, _ in spec]), torch.tensor([s for _, s in spec]), masks


def test_to_detections_thresholds_order_cap_and_names():
    dog, mouse = GENEVAL_CLASSES.index("dog"), GENEVAL_CLASSES.index("computer mouse")
    spec = [(dog, 0.5), (dog, 0.95), (mouse, 0.3), (mouse, 0.31), (dog, 0.92)]
    spec += [(dog, 0.4 + 0.01 * k) for k in range(15)]
    labels, scores, masks = _instance_set(spec)
    dets, kept = to_detections(labels, scores, masks, geneval_class_names(HF_ID2LABEL))
    assert len(dets) == len(kept) == len(spec) - 1  # 0.3 is not > 0.3
    assert [d.score for d in dets] == pytest.approx(sorted((s for _, s in spec if s > 0.3), reverse=True))
    assert dets[0].label == "dog" and dets[0].box == (4.0, 0.0, 8.0, 4.0)  # instance 1
    assert np.array_equal(kept[0], masks[1].numpy())
    assert [d.label for d in dets if d.label != "dog"] == ["computer mouse"]
    assert all(d.color is None for d in dets)
    objects = keep_detections(dets, "two_object")
    dog_scores = sorted((s for c, s in spec if c == dog), reverse=True)
    assert [d.score for d in objects["dog"]] == pytest.approx(dog_scores[:16]) and len(dog_scores) == 18
    assert [d.score for d in keep_detections(dets, "counting")["dog"]] == pytest.approx([0.95, 0.92])
    count2 = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    assert evaluate(count2, dets)[0]  # the 0.5..0.54 dogs do not count for counting
    assert not evaluate({**count2, "tag": "two_object"}, dets)[0]


def test_crop_on_background_is_999_outside_the_mask():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:12, 8:20] = True
    mask[6, 8] = False
    crop = crop_on_background(image, mask, (6.0, 4.0, 22.0, 14.0))
    assert crop.shape == (10, 16, 3) and crop.dtype == np.uint8
    inside = mask[4:14, 6:22]
    assert np.array_equal(crop[inside], image[4:14, 6:22][inside])
    assert (crop[~inside] == 153).all() and (~inside).sum() > 0
    assert crop_on_background(image, mask, (7.6, 4.4, 20.2, 13.5)).shape == (10, 12, 3)  # rounded, not truncated


def _open_clip_transform(side: int):
    """GenEval's colour preprocessing, open_clip's ViT-L-14 ``openai`` evaluation transform, on PIL images."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(side, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(side), T.ToTensor(),
                      T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])


def _official_crop(image: np.ndarray, mask: np.ndarray, box) -> Image.Image:
    """evaluate_images.py ``ImageCrops``: composite over a #999 image through the mask, then PIL ``crop`` of the
    float32 box (as numpy scalars: this Pillow refuses the array itself)."""
    pil = Image.fromarray(image).convert("RGB")
    blank = Image.new("RGB", pil.size, color="#999")
    return Image.composite(pil, blank, Image.fromarray(mask)).crop(tuple(box[:4]))


def _crop_sizes() -> list[tuple[int, int]]:
    """Crop shapes: tiny to large, square, both orientations, odd and even margins after the resize."""
    sizes = [(1, 1), (1, 9), (9, 1), (7, 7), (224, 224), (224, 301), (301, 224), (225, 225), (512, 512)]
    rng = np.random.default_rng(11)
    return sizes + [tuple(int(v) for v in rng.integers(2, 400, 2)) for _ in range(40)]


def test_color_crops_equal_open_clips_transform_at_224():
    ours = clip_transform("torchvision_pil", 224, 224)
    reference = _open_clip_transform(224)
    rng = np.random.default_rng(12)
    crops = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in _crop_sizes()]
    expected = torch.stack([reference(Image.fromarray(c)) for c in crops])
    torch.testing.assert_close(ours(crops, "cpu"), expected, atol=1e-6, rtol=0)


def test_color_crops_equal_the_official_composite_crop_and_transform(scorer):
    """The whole path on the scorer's own encoder (side 32): mask composite, box crop, preprocessing."""
    encoder = scorer.colors.encoder
    assert encoder.preprocessing == "torchvision_pil" and (encoder.size, encoder.crop) == (32, 32)
    reference = _open_clip_transform(32)
    rng = np.random.default_rng(13)
    ours, expected = [], []
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(20, 90, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        y0, x0 = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
        y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
        mask = np.zeros((h, w), dtype=bool)
        mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
        box = np.asarray(mask_boxes(torch.from_numpy(mask)[None])[0], dtype=np.float32)  # mmdet's float32 boxes
        if rng.random() < 0.5:  # fractional corners, halves included: both round half to even
            box = box + rng.choice([-0.5, 0.5, 0.4, -0.6], 4).astype(np.float32)
            box[:2] = np.clip(box[:2], 0, [w - 1, h - 1])
            box[2:] = np.clip(box[2:], np.round(box[:2]) + 1, [w, h])  # inside the image, at least one pixel
        ours.append(crop_on_background(image, mask, tuple(float(v) for v in box)))
        expected.append(reference(_official_crop(image, mask, box)))
    torch.testing.assert_close(encoder.pixels(ours, "cpu"), torch.stack(expected), atol=1e-6, rtol=0)


def test_floor_and_round_crop_offsets_differ_and_the_official_one_rounds():
    """A 10 x 27 crop resized to 224 x 604: margin 380 is even; 10 x 23 -> 224 x 515: margin 291, offset
    145 (floor) vs 146 (round, 145.5 -> 146). A margin of 4k + 1 rounds down like floor (half to even)."""
    rng = np.random.default_rng(14)
    crop = rng.integers(0, 256, (10, 23, 3), dtype=np.uint8)
    reference = _open_clip_transform(224)(Image.fromarray(crop))[None]
    floor = clip_transform("transformers_pil", 224, 224)([crop], "cpu")
    round_ = clip_transform("torchvision_pil", 224, 224)([crop], "cpu")
    torch.testing.assert_close(round_, reference, atol=1e-6, rtol=0)
    assert (floor - reference).abs().max() > 0.1
    torch.testing.assert_close(floor[..., 1:], round_[..., :-1], atol=1e-6, rtol=0)  # shifted by one column


def test_color_classifier_matches_float64_hand_computation(scorer):
    clf = scorer.colors
    assert clf.autocast is None  # CPU: never autocast
    rng = np.random.default_rng(5)
    shapes = [(12, 30), (40, 16), (7, 7), (64, 50), (10, 23), (23, 10)]  # the last two: odd margins at side 32
    crops = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    classes = ["dog", "computer mouse", "dog", "hot dog", "tie", "dog"]
    model = copy.deepcopy(clf.model).double()
    templates = ["a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object"]

    def embed(text: str) -> torch.Tensor:  # one prompt at a time, no padding
        tokens = clf.tokenizer([text], return_tensors="pt")
        out = model.get_text_features(**tokens)
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)[0]

    with torch.no_grad():
        weights = {cls: F.normalize(torch.stack([
            torch.stack([embed(t.format(c=c, cls=cls)) for t in templates]).mean(0) for c in COLORS]), dim=-1)
            for cls in set(classes)}
        pixels = torch.stack([_open_clip_transform(32)(Image.fromarray(c)) for c in crops]).double()
        out = model.get_image_features(pixel_values=pixels)
        feats = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    hand = 100.0 * torch.stack([weights[cls] @ f for cls, f in zip(classes, feats, strict=True)])
    for cls in set(classes):
        assert torch.allclose(clf.text_weights(cls).double(), weights[cls], atol=1e-5)
    assert torch.allclose(clf.logits(crops, classes).double(), hand, atol=1e-3)
    top2 = hand.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2
    got = clf(crops, classes)
    assert [g for g, c in zip(got, clear, strict=True) if c] == \
        [COLORS[int(i)] for i, c in zip(hand.argmax(1), clear, strict=True) if c]
    assert clear.any() and clf([], []) == []


def test_scorer_records_determinism_and_batching(scorer, monkeypatch):
    images = _images(3)
    found = scorer.instances(images)
    assert all(d.score > 0.3 and d.color is None and d.label in GENEVAL_CLASSES for dets, _ in found for d in dets)
    assert all(len({d.label for d in dets}) >= 2 for dets, _ in found)  # the tiny detector finds things
    pairs = [(dets[0].label, next(d.label for d in dets if d.label != dets[0].label)) for dets, _ in found]
    (a0, _), (a1, _), (a2, b2) = pairs  # per image: the top class and another one
    metas = [  # a colour clause, a counting clause (threshold 0.9) and two colour clauses, on what was found
        {"tag": "colors", "include": [{"class": a0, "count": 1, "color": "red"}], "prompt": f"a red {a0}"},
        {"tag": "counting", "include": [{"class": a1, "count": 2}], "prompt": f"two {a1}s"},
        {"tag": "color_attr", "include": [{"class": a2, "count": 1, "color": "blue"},
                                          {"class": b2, "count": 1, "color": "green"}], "prompt": f"{a2} and {b2}"},
    ]
    prompts = [m["prompt"] for m in metas]
    calls, seen = [], []
    original_colors, original_instances = type(scorer.colors).__call__, scorer.instances

    def spy_colors(self, crops, classes):
        calls.append(list(classes))
        return original_colors(self, crops, classes)

    def spy_instances(batch):
        seen.append(original_instances(batch))
        return seen[-1]

    monkeypatch.setattr(type(scorer.colors), "__call__", spy_colors)
    monkeypatch.setattr(scorer, "instances", spy_instances)
    records = scorer.score(images, prompts, metas)
    assert calls == [[a0, a2, b2]]  # one CLIP call, only for the colour clauses' top objects
    assert len(records) == 3 and all(r.score in (0.0, 1.0) for r in records)
    assert all(set(r.details) == {"tag", "strict", "reason"} for r in records)
    n_sure = sum(d.label == a1 and d.score > 0.9 for d in found[1][0])
    assert records[1].score == float(n_sure == 2)
    assert records[1].score == 1.0 or records[1].details["reason"].startswith(f"expected {a1}>=2, found {n_sure}")
    for r in (records[0], records[2]):
        assert r.score == 1.0 or "; and 1 " in r.details["reason"]  # colour failures name the colour found
    agg = scorer.aggregate(records)
    assert set(agg) == {"geneval", "geneval_strict", "geneval/colors", "geneval/counting", "geneval/color_attr"}
    one_by_one = [scorer.score(images[i:i + 1], prompts[i:i + 1], metas[i:i + 1])[0] for i in range(3)]
    assert [(r.score, r.details) for r in one_by_one] == [(r.score, r.details) for r in records]
    assert calls[1:] == [[a0], [], [a2, b2]]  # colour only where needed (no CLIP call for an empty list)
    again = seen[0]  # same batch, second forward: deterministic
    assert [[(d.label, d.score, d.box) for d in dets] for dets, _ in again] == \
        [[(d.label, d.score, d.box) for d in dets] for dets, _ in found]
    for (dets, masks), ((single, single_masks),) in zip(found, seen[1:], strict=True):  # batched == one by one
        assert [(d.label, d.box) for d in single] == [(d.label, d.box) for d in dets]
        assert [d.score for d in single] == pytest.approx([d.score for d in dets], abs=1e-5)
        assert all(np.array_equal(a, b) for a, b in zip(single_masks, masks, strict=True))


def test_detect_colours_only_what_colour_clauses_inspect(scorer, monkeypatch):
    dog, cat = GENEVAL_CLASSES.index("dog"), GENEVAL_CLASSES.index("cat")
    found = [to_detections(*_instance_set([(dog, 0.9), (dog, 0.8), (cat, 0.7), (dog, 0.6)]), GENEVAL_CLASSES),
             to_detections(*_instance_set([(cat, 0.95), (cat, 0.5)]), GENEVAL_CLASSES)]
    monkeypatch.setattr(scorer, "instances", lambda images: found)
    calls = []

    def colors(crops, classes):
        calls.append((classes, [c.shape for c in crops]))
        return ["red"] * len(crops)

    monkeypatch.setattr(scorer, "colors", colors)
    metas = [{"tag": "color_attr", "include": [{"class": "dog", "count": 2, "color": "red"},
                                               {"class": "cat", "count": 2, "color": "blue"}]},  # one cat only
             {"tag": "counting", "include": [{"class": "cat", "count": 2, "color": "red"}]}]  # 0.5 < 0.9
    out = scorer.detect(np.zeros((2, 40, 40, 3), np.uint8), metas)
    assert calls == [(["dog", "dog"], [(4, 4, 3), (4, 4, 3)])]
    assert [d.color for d in out[0]] == ["red", "red", None, None] and [d.color for d in out[1]] == [None, None]
    metas[1]["tag"] = "colors"  # now both cats count
    calls.clear()
    out = scorer.detect(np.zeros((2, 40, 40, 3), np.uint8), metas)
    assert calls[0][0] == ["dog", "dog", "cat", "cat"] and [d.color for d in out[1]] == ["red", "red"]


def test_missing_checkpoints_name_the_param(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.mask2former"):
        build_scorer("geneval", backend="mask2former")
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.mask2former.*does not exist"):
        build_scorer("geneval", backend="mask2former", checkpoints={**checkpoints, "mask2former": str(tmp_path / "x")})
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.mask2former.*lacks config\.json"):
        build_scorer("geneval", backend="mask2former", checkpoints={**checkpoints, "mask2former": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.clip_vit_l14"):
        build_scorer("geneval", backend="mask2former", checkpoints={"mask2former": checkpoints["mask2former"]})
    with pytest.raises(ValueError, match="dtype"):
        build_scorer("geneval", backend="mask2former", checkpoints=checkpoints, dtype="float8")



def test_bfloat16_runs_end_to_end(checkpoints):
    half = build_scorer("geneval", backend="mask2former", checkpoints=checkpoints, dtype="bfloat16")
    assert next(half.detector.parameters()).dtype == torch.bfloat16
    assert next(half.colors.model.parameters()).dtype == torch.bfloat16
    meta = {"tag": "colors", "include": [{"class": "tie", "count": 1, "color": "red"}]}
    half.colors.text_weights("tie")  # text path in bfloat16
    assert half.colors([np.zeros((5, 9, 3), np.uint8)], ["tie"])[0] in COLORS
    record = half.score(_images(1), ["a red tie"], [meta])[0]
    assert record.score in (0.0, 1.0) and record.details["tag"] == "colors"


def test_autocast_is_resolved_for_cuda_only():
    assert resolve_autocast("cuda", "float16") == ("cuda", torch.float16)
    assert resolve_autocast(torch.device("cuda", 1), "bfloat16") == ("cuda", torch.bfloat16)
    assert resolve_autocast("cpu", "float16") is None and resolve_autocast("cuda", None) is None
    with pytest.raises(ValueError, match="colour autocast dtype"):
        resolve_autocast("cuda", "int8")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_context_enters_the_dtype(dtype):
    layer = torch.nn.Linear(4, 2)
    with autocast_context(("cpu", dtype)):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
        assert layer(torch.ones(1, 4)).dtype == dtype
    with autocast_context(None):
        assert not torch.is_autocast_enabled("cpu") and layer(torch.ones(1, 4)).dtype == torch.float32


def test_both_colour_forwards_run_under_the_configured_autocast(checkpoints, monkeypatch):
    """With the CPU let in as an autocast device, the text and image forwards see autocast at the configured
    dtype, and the logits come out of a matmul in that dtype (float32 values rounded to it)."""
    monkeypatch.setattr(geneval_m2f, "AUTOCAST_DEVICE_TYPES", ("cuda", "cpu"))
    clf = ColorClassifier(load_clip(checkpoints["clip_vit_l14"]), autocast="bfloat16")
    assert clf.autocast == ("cpu", torch.bfloat16) and clf.encoder.preprocessing == "torchvision_pil"
    seen = []
    for name in ("get_image_features", "get_text_features"):
        original = getattr(clf.model, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(clf.model, name, spy)
    crops = [np.random.default_rng(15).integers(0, 256, (9, 14, 3), dtype=np.uint8)]
    logits = clf.logits(crops, ["dog"])
    assert sorted(seen) == [("get_image_features", True, torch.bfloat16), ("get_text_features", True, torch.bfloat16)]
    assert logits.dtype == torch.float32 and torch.equal(logits, logits.bfloat16().float())
    assert clf(crops, ["dog"])[0] in COLORS and not torch.is_autocast_enabled("cpu")


def test_the_autocast_option_reaches_the_classifier_and_changes_nothing_on_cpu(checkpoints, monkeypatch):
    from pipeline.config import ScoreCheckpoints, ScoreConfig
    from pipeline.evaluation import build_scorers, scorer_options

    cfg = ScoreConfig(geneval_backend="mask2former", geneval_color_autocast="bfloat16", device="cpu",
                      checkpoints=ScoreCheckpoints(**checkpoints))
    assert scorer_options(cfg)["geneval"] == {"backend": "mask2former", "color_autocast": "bfloat16"}
    assert ScoreConfig().geneval_color_autocast == "float16"  # the official evaluator's amp
    on_cpu = build_scorers(cfg, ["geneval"])["geneval"]
    assert on_cpu.colors.autocast is None
    off = build_scorer("geneval", backend="mask2former", checkpoints=checkpoints, color_autocast=None)
    rng = np.random.default_rng(16)
    crops = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((9, 14), (40, 31), (64, 64))]
    classes = ["dog", "tie", "hot dog"]
    assert torch.equal(on_cpu.colors.logits(crops, classes), off.colors.logits(crops, classes))
    monkeypatch.setattr(geneval_m2f, "AUTOCAST_DEVICE_TYPES", ("cuda", "cpu"))  # where it would autocast
    assert build_scorers(cfg, ["geneval"])["geneval"].colors.autocast == ("cpu", torch.bfloat16)
    assert build_scorer("geneval", backend="mask2former", checkpoints=checkpoints).colors.autocast == \
        ("cpu", torch.float16)
    assert build_scorer("geneval", backend="tiny", color_autocast="bfloat16").name == "geneval"  # ignored there


def test_the_config_accepts_the_classifiers_dtypes_and_null():
    from typing import get_args, get_type_hints

    from pipeline.config import ConfigError, ScoreConfig, parse_config

    hint = get_type_hints(ScoreConfig)["geneval_color_autocast"]
    assert tuple(a for arg in get_args(hint) for a in get_args(arg)) == COLOR_AUTOCAST_DTYPES
    assert parse_config({"score": {"geneval_color_autocast": None}}).score.geneval_color_autocast is None
    assert parse_config({"score": {"geneval_color_autocast": "bfloat16"}}).score.geneval_color_autocast == "bfloat16"
    with pytest.raises(ConfigError, match=r"score\.geneval_color_autocast: 'float32' is not one of"):
        parse_config({"score": {"geneval_color_autocast": "float32"}})
