"""CLIP-based scorers (clipscore, pickscore, aesthetic) on tiny random CLIP checkpoints, plus the shared
CLIP image preprocessing against each reference: transformers' PIL processor (PickScore, Aesthetic) and
Flow-GRPO's torchvision transform on float tensors (ClipScore)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from soar.models.tiny import build_clip_tokenizer
from soar.rewards import build_scorer
from soar.rewards.clip_scores import AESTHETIC_MLP_LAYOUT, AestheticMLP
from soar.rewards.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_pixels, clip_transform, resize_center_crop

SIZE = 32  # tiny CLIP input side
WORDS = ["a", "photo", "of", "red", "blue", "cat", "dog", "on", "the", "table"]
PROMPTS = ["a photo of a red cat", "a blue dog on the table", "a photo of a red cat"]


class _PublishedMLP(nn.Module):
    """The MLP as written in improved-aesthetic-predictor simple_inference.py (its ReLUs commented out)."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``clip``: model + tokenizer + preprocessor; ``pick``: model only; ``proc``: tokenizer + preprocessor."""
    root = tmp_path_factory.mktemp("clip")
    tok = build_clip_tokenizer(WORDS, 77)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=SIZE, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768))
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    for name in ("clip", "pick"):
        if name == "pick":
            model.logit_scale.data.fill_(3.0)  # PickScore's own learned scale differs from CLIP's init
        model.save_pretrained(root / name)
    for name in ("clip", "proc"):
        tok.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    mlp = _PublishedMLP()
    torch.save(mlp.state_dict(), root / "mlp.pth")
    return root


def _reference_embeddings(model_dir, proc_dir, images, prompts=None):
    """float64 unit embeddings by hand: reference PIL processor, tokenizer, model.double()."""
    model = CLIPModel.from_pretrained(model_dir).double().eval()
    pixels = CLIPImageProcessorPil.from_pretrained(proc_dir)(images=list(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels.double()).pooler_output
        txt = None
        if prompts is not None:
            tokens = CLIPTokenizer.from_pretrained(proc_dir)(prompts, padding=True, return_tensors="pt")
            txt = model.get_text_features(**tokens).pooler_output
            txt = txt / txt.norm(dim=-1, keepdim=True)
    return model, img / img.norm(dim=-1, keepdim=True), txt


def _flow_grpo_transform(size: int, crop: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """Flow-GRPO's clip_scorer.py transform: torchvision Resize(shortest edge) (tensor input: bilinear, antialias),
    CenterCrop((crop, crop)), Normalize, composed and applied to the float [0, 1] batch."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size), T.CenterCrop((crop, crop)), T.Normalize(mean=mean, std=std)])


def _as_float_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1], as Flow-GRPO's reward function converts arrays."""
    return torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.uint8) / 255.0


def _flow_grpo_cosines(model_dir, images, prompts):
    """float64 cosines by Flow-GRPO's ClipScorer recipe: its transform, prompts padded to 77 tokens, one CLIPModel
    forward; ``logits_per_image.diagonal()`` over ``logit_scale.exp()`` (Flow-GRPO divides by 30 instead)."""
    model = CLIPModel.from_pretrained(model_dir).double().eval()
    proc = CLIPImageProcessorPil.from_pretrained(model_dir)
    tform = _flow_grpo_transform(proc.size["shortest_edge"], proc.crop_size["height"], proc.image_mean, proc.image_std)
    texts = CLIPTokenizer.from_pretrained(model_dir)(prompts, padding="max_length", truncation=True,
                                                     return_tensors="pt")
    assert texts["input_ids"].shape[1] == 77
    with torch.no_grad():
        out = model(pixel_values=tform(_as_float_batch(images)).double(), **texts)
        return out.logits_per_image.diagonal() / model.logit_scale.exp()


def _images(seed=0, shapes=((37, 53), (64, 48), (32, 32))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _batch(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 56, 3), dtype=np.uint8)


def test_clip_pixels_equal_the_pil_reference_processor():
    for size, crop in ((32, 32), (40, 32)):  # crop < size: odd margins exercise the crop offset
        proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
        images = _images(shapes=((37, 53), (64, 48), (41, 41)))
        ref = proc(images=images, return_tensors="pt").pixel_values
        assert torch.allclose(clip_pixels(images, size, crop=crop), ref, atol=1e-5, rtol=0)
        assert torch.allclose(clip_pixels(np.stack([im[:37, :48] for im in images[:2]]), size, crop=crop),
                              proc(images=[im[:37, :48] for im in images[:2]], return_tensors="pt").pixel_values,
                              atol=1e-5, rtol=0)


def test_round_crop_offset_matches_torchvision_center_crop():
    from torchvision import transforms

    tv = transforms.Compose([transforms.Resize(40, transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(32)])
    for image in _images(shapes=((37, 55), (55, 37), (64, 47))):
        ours = resize_center_crop(image, 40, crop=32, crop_offset="round")
        assert np.array_equal(ours, np.asarray(tv(Image.fromarray(image))))
    image = _images(shapes=((37, 55),))[0]  # resized to 40x59: margin 27, offset 13 (floor) vs 14 (round)
    assert not np.array_equal(resize_center_crop(image, 40, crop=32), resize_center_crop(image, 40, crop=32,
                                                                                          crop_offset="round"))


FLOAT_SHAPES = ((512, 512), (512, 768), (768, 512), (601, 333), (225, 300), (224, 401), (300, 225), (57, 91))


@pytest.mark.parametrize(("size", "crop"), [(224, 224), (32, 32), (40, 32)])
def test_float_pixels_equal_flow_grpos_torchvision_transform(size, crop):
    """Square 512, non-square both ways, margins odd and even, no-resize (short side == size) and upscaled."""
    ours = clip_transform("torchvision_float", size, crop)
    reference = _flow_grpo_transform(size, crop)
    rng = np.random.default_rng(size + crop)
    for h, w in FLOAT_SHAPES:
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        torch.testing.assert_close(ours(images, "cpu"), reference(_as_float_batch(images)), atol=1e-6, rtol=0)
    mixed = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((300, 400), (512, 512), (300, 400), (91, 57))]
    got = ours(mixed, "cpu")  # one call per size, rows back in input order
    expected = torch.cat([reference(_as_float_batch(im[None])) for im in mixed])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert ours(np.zeros((0, 64, 64, 3), np.uint8), "cpu").shape == (0, 3, crop, crop)


def test_the_pil_path_is_not_flow_grpos_transform():
    """The transformers PIL path (bicubic on uint8, then scale) differs from the float one: the test above can fail."""
    images = np.random.default_rng(7).integers(0, 256, (2, 512, 512, 3), dtype=np.uint8)
    reference = _flow_grpo_transform(224, 224)(_as_float_batch(images))
    assert (clip_pixels(images, 224) - reference).abs().max() > 0.05
    assert (clip_transform("transformers_pil", 224, 224)(images, "cpu") - reference).abs().max() > 0.05


def test_clipscore_is_cosine_and_deterministic(folders):
    scorer = build_scorer("clipscore", checkpoints={"clip_vit_l14": str(folders / "clip")})
    assert scorer.encoder.preprocessing == "torchvision_float"
    images = _batch()
    records = scorer.score(images, PROMPTS, [{}] * 3)
    assert len(records) == 3 and all(type(r.score) is float for r in records)
    assert [r.score for r in scorer.score(images, PROMPTS, [{}] * 3)] == [r.score for r in records]
    expected = _flow_grpo_cosines(folders / "clip", images, PROMPTS)
    got = torch.tensor([r.score for r in records], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-5)
    assert scorer.aggregate(records)["clipscore"] == pytest.approx(float(expected.mean()), abs=1e-5)
    _, img, txt = _reference_embeddings(folders / "clip", folders / "clip", images, PROMPTS)
    assert not torch.allclose(got, (img * txt).sum(-1), atol=1e-4)  # the transformers PIL preprocessing differs


def test_pickscore_is_logit_scale_times_cosine(folders):
    scorer = build_scorer("pickscore", checkpoints={"pickscore": str(folders / "pick"),
                                                    "pickscore_processor": str(folders / "proc")})
    images = _batch(seed=1)
    got = torch.tensor([r.score for r in scorer.score(images, PROMPTS, [{}] * 3)], dtype=torch.float64)
    model, img, txt = _reference_embeddings(folders / "pick", folders / "proc", images, PROMPTS)
    assert model.logit_scale.item() == 3.0
    assert torch.allclose(got, np.exp(3.0) * (img * txt).sum(-1), atol=1e-4)


def test_colours_channel_order_batching_and_truncation(folders):
    scorer = build_scorer("clipscore", checkpoints={"clip_vit_l14": str(folders / "clip")})
    red, blue = np.zeros((2, SIZE, SIZE, 3), dtype=np.uint8), np.zeros((1, SIZE, SIZE, 3), dtype=np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    emb = scorer.encoder.embed_images(np.concatenate([red[:1], blue]))
    assert (emb[0] - emb[1]).abs().max() > 1e-3
    images = _batch(seed=2)
    rgb = [r.score for r in scorer.score(images, PROMPTS, [{}] * 3)]
    bgr = [r.score for r in scorer.score(np.ascontiguousarray(images[..., ::-1]), PROMPTS, [{}] * 3)]
    assert all(abs(a - b) > 1e-6 for a, b in zip(rgb, bgr, strict=True))
    one_by_one = [scorer.score(images[i:i + 1], PROMPTS[i:i + 1], [{}])[0].score for i in range(3)]
    np.testing.assert_allclose(one_by_one, rgb, atol=1e-6)
    long_a, long_b = "red " * 100, "red " * 100 + "blue cat"  # equal after truncation to 77 tokens
    a, b = scorer.score(red, [long_a, long_b], [{}] * 2)
    assert a.score == pytest.approx(b.score, abs=1e-6)


def test_aesthetic_layout_is_the_published_one():
    published = {k: tuple(v.shape) for k, v in _PublishedMLP().state_dict().items()}
    assert AESTHETIC_MLP_LAYOUT == published
    assert {k: tuple(v.shape) for k, v in AestheticMLP().state_dict().items()} == published
    assert repr(AestheticMLP().layers) == repr(_PublishedMLP().layers)  # widths, dropout rates, order


def test_aesthetic_is_mlp_of_normalised_image_embedding(folders):
    scorer = build_scorer("aesthetic", checkpoints={"clip_vit_l14": str(folders / "clip"),
                                                    "aesthetic_mlp": str(folders / "mlp.pth")})
    images = _images(seed=3)  # different sizes: the prepare-stage entry point
    got = scorer.predict(images)
    assert got.shape == (3,) and got.dtype == np.float64
    _, img, _ = _reference_embeddings(folders / "clip", folders / "clip", images)
    mlp = _PublishedMLP().double().eval()
    mlp.load_state_dict(torch.load(folders / "mlp.pth"))
    with torch.no_grad():
        expected = mlp(img)[:, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    records = scorer.score(np.stack([im[:32, :32] for im in images]), ["x", "y", "z"], [{}] * 3)
    assert [r.score for r in records] == pytest.approx(scorer.predict([im[:32, :32] for im in images]).tolist())


def test_aesthetic_rejects_another_layout(folders, tmp_path):
    state = _PublishedMLP().state_dict()
    state["layers.7.weight"] = torch.zeros(2, 16)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"score\.checkpoints\.aesthetic_mlp.*layers\.7\.weight"):
        build_scorer("aesthetic", checkpoints={"clip_vit_l14": str(folders / "clip"),
                                               "aesthetic_mlp": str(tmp_path / "bad.pth")})


def test_missing_checkpoints_name_the_param_and_file(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.clip_vit_l14"):
        build_scorer("clipscore", checkpoints={"clip_vit_l14": None})
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.aesthetic_mlp"):
        build_scorer("aesthetic", checkpoints={"clip_vit_l14": str(folders / "clip"), "aesthetic_mlp": None})
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.pickscore: .*config\.json"):
        build_scorer("pickscore", checkpoints={"pickscore": str(folders / "proc"),
                                               "pickscore_processor": str(folders / "proc")})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.clip_vit_l14.*preprocessor_config\.json"):
        build_scorer("clipscore", checkpoints={"clip_vit_l14": str(tmp_path)})
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.clip_vit_l14.*model\.safetensors"):
        build_scorer("clipscore", checkpoints={"clip_vit_l14": str(tmp_path)})


def test_dtype_option_and_empty_batch(folders):
    checkpoints = {"clip_vit_l14": str(folders / "clip")}
    half = build_scorer("clipscore", checkpoints=checkpoints, dtype="bfloat16")
    assert half.encoder.model.dtype == torch.bfloat16
    full = build_scorer("clipscore", checkpoints=checkpoints)
    images = _batch(seed=4)
    got = [r.score for r in half.score(images, PROMPTS, [{}] * 3)]
    assert all(type(s) is float for s in got)
    np.testing.assert_allclose(got, [r.score for r in full.score(images, PROMPTS, [{}] * 3)], atol=0.05)
    assert full.score(images[:0], [], []) == []
    with pytest.raises(ValueError, match="dtype"):
        build_scorer("clipscore", checkpoints=checkpoints, dtype="int8")
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        full.score(images, PROMPTS[:2], [{}] * 2)
