"""HPSv2.1 and ImageReward scorers on tiny random checkpoints, loaded through the real factories offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from soar.rewards import available, build_scorer
from soar.rewards.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_pixels

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")

from soar.rewards import hps as hps_mod  # noqa: E402
from soar.rewards import image_reward as ir  # noqa: E402

MEAN, STD = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
PROMPTS = ["a photo of a red cat", "a photo of a blue dog", "a sign that says cat"]

# ---------------------------------------------------------------------------------------------- HPSv2.1
TINY_HPS_ARCH = "soar-test-tiny-hps"  # same family as ViT-H-14 (ViT + text transformer), seconds to build
TINY_HPS_CFG = {"embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def images(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]


def solid(rgb, size=40):
    return np.broadcast_to(np.array(rgb, np.uint8), (1, size, size, 3)).copy()


@pytest.fixture(scope="module")
def hps_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    (root / f"{TINY_HPS_ARCH}.json").write_text(json.dumps(TINY_HPS_CFG))
    open_clip.add_model_config(root / f"{TINY_HPS_ARCH}.json")  # open_clip's registry of model configs
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(TINY_HPS_ARCH, pretrained=None).state_dict()},
               root / hps_mod.HPS_FILE)
    return root / hps_mod.HPS_FILE


@pytest.fixture(scope="module")
def hps(hps_ckpt):
    return build_scorer("hpsv21", checkpoints={"hpsv21": str(hps_ckpt)}, arch=TINY_HPS_ARCH)


def hps_reference_pixels(im: np.ndarray, size: int) -> np.ndarray:
    """HPSv2's preprocess_val written out: ResizeMaxSize (longer side, bicubic, black centred pad), normalise."""
    h, w = im.shape[:2]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = np.asarray(Image.fromarray(im).resize((nw, nh), Image.Resampling.BICUBIC))
    return ((canvas / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def test_registered_and_missing_checkpoints_name_the_param():
    assert {"hpsv21", "imagereward"} <= set(available())
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.hpsv21"):
        build_scorer("hpsv21", checkpoints={"hpsv21": None})
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.image_reward\b"):
        build_scorer("imagereward", checkpoints={"image_reward": None, "image_reward_tokenizer": None})


def test_hps_preprocessing_is_hpsv2_letterbox(hps):
    for im in images((40, 24), (24, 40), (45, 31)):  # non-square: longer side to 32, black padding
        got = hps.pixels(im[None])[0].numpy()
        np.testing.assert_allclose(got, hps_reference_pixels(im, 32), atol=1e-5)
    square = images((48, 48))[0]  # square: the same as open_clip's resize-shorter-side + centre crop
    plain = open_clip.image_transform(32, is_train=False)
    np.testing.assert_allclose(hps.pixels(square[None])[0], plain(Image.fromarray(square)), atol=1e-6)


def test_hps_scores_match_float64_computation(hps, hps_ckpt):
    batch = np.stack(images((40, 40), (40, 40), (40, 40), seed=1))
    got = [r.score for r in hps.score(batch, PROMPTS, [{}] * 3)]
    assert all(type(s) is float for s in got)
    model = open_clip.create_model(TINY_HPS_ARCH, pretrained=None)
    model.load_state_dict(torch.load(hps_ckpt, weights_only=True)["state_dict"])
    model = model.double().eval()
    x = torch.from_numpy(np.stack([hps_reference_pixels(im, 32) for im in batch]))
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(PROMPTS)), dim=-1)
    np.testing.assert_allclose(got, torch.diagonal(img @ txt.T).numpy(), atol=1e-5)


def test_hps_deterministic_rgb_order_and_batching(hps):
    batch = np.stack(images((40, 40), (40, 40), (40, 40), seed=2))
    first = [r.score for r in hps.score(batch, PROMPTS, [{}] * 3)]
    assert first == [r.score for r in hps.score(batch, PROMPTS, [{}] * 3)]
    one_by_one = [hps.score(batch[i:i + 1], PROMPTS[i:i + 1], [{}])[0].score for i in range(3)]
    np.testing.assert_allclose(first, one_by_one, atol=1e-6)
    bgr = [r.score for r in hps.score(batch[..., ::-1].copy(), PROMPTS, [{}] * 3)]
    assert not np.allclose(first, bgr, atol=1e-4)
    red, blue = (hps.score(solid(c), PROMPTS[:1], [{}])[0].score for c in ((255, 0, 0), (0, 0, 255)))
    assert abs(red - blue) > 1e-4
    assert hps.score(batch[:0], [], []) == []


def test_hps_download_only_when_allowed(hps_ckpt, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename: calls.append((repo_id, filename)) or str(hps_ckpt))
    build_scorer("hpsv21", checkpoints={"hpsv21": None}, allow_download=True, arch=TINY_HPS_ARCH)
    assert calls == [("xswu/HPSv2", "HPS_v2.1_compressed.pt")]


def test_hps_published_architecture_key_names():
    """open_clip's ViT-H-14 (built on the meta device) has the keys/shapes of HPS_v2.1_compressed.pt."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  open_clip.model.CLIP(**open_clip.get_model_config(hps_mod.HPS_ARCH)).state_dict().items()}
    assert {k: shapes.get(k) for k in [
        "visual.positional_embedding", "visual.conv1.weight", "visual.proj", "text_projection",
        "token_embedding.weight", "positional_embedding", "logit_scale",
        "visual.transformer.resblocks.31.attn.in_proj_weight", "transformer.resblocks.23.mlp.c_fc.weight"]} == {
        "visual.positional_embedding": (257, 1280), "visual.conv1.weight": (1280, 3, 14, 14),
        "visual.proj": (1280, 1024), "text_projection": (1024, 1024), "token_embedding.weight": (49408, 1024),
        "positional_embedding": (77, 1024), "logit_scale": (),
        "visual.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024)}


# ------------------------------------------------------------------------------------------- ImageReward
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "blue", "cat", "dog", "sign",
         "that", "says", "the", "on", "and"]
TINY_IR = ir.ImageRewardArch(image_size=32, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2,
                             vocab_size=len(VOCAB) + 2, hidden_size=32, num_layers=2, num_heads=2,
                             intermediate_size=64, max_position_embeddings=40, proj_dim=16)


@pytest.fixture(scope="module")
def ir_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ir")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    state = ir.ImageRewardNet(TINY_IR).state_dict()
    state[ir.POSITION_IDS_KEY] = torch.arange(TINY_IR.max_position_embeddings)[None]  # med.py saves it
    torch.save(state, root / ir.IMAGE_REWARD_FILE)
    return {"image_reward": str(root / ir.IMAGE_REWARD_FILE), "image_reward_tokenizer": str(root / "tokenizer")}


@pytest.fixture(scope="module")
def imr(ir_files):
    return build_scorer("imagereward", checkpoints=ir_files, arch=TINY_IR)


def test_ir_missing_tokenizer_names_the_param(ir_files):
    with pytest.raises(FileNotFoundError, match=r"score\.checkpoints\.image_reward_tokenizer"):
        build_scorer("imagereward", checkpoints={**ir_files, "image_reward_tokenizer": None}, arch=TINY_IR)


def test_ir_loads_strictly(imr, ir_files, tmp_path):
    saved = torch.load(ir_files["image_reward"], weights_only=True)
    loaded = imr.net.state_dict()
    assert set(saved) - set(loaded) == {ir.POSITION_IDS_KEY}
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)
    for name, edit in [("missing", lambda s: s.pop("mlp.layers.7.bias")),
                       ("unexpected", lambda s: s.__setitem__("blip.itm_head.weight", torch.zeros(2, 32)))]:
        state = dict(saved)
        edit(state)
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(RuntimeError, match=r"score\.checkpoints\.image_reward"):
            build_scorer("imagereward", checkpoints={**ir_files, "image_reward": str(tmp_path / f"{name}.pt")},
                         arch=TINY_IR)


def test_ir_published_architecture_key_names():
    """The default (published) config, built on the meta device, has ImageReward.pt's keys and shapes."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ir.ImageRewardNet().state_dict().items()}
    expected = {
        "blip.visual_encoder.cls_token": (1, 1, 1024), "blip.visual_encoder.pos_embed": (1, 197, 1024),
        "blip.visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
        "blip.visual_encoder.blocks.23.attn.qkv.weight": (3072, 1024),
        "blip.visual_encoder.blocks.23.attn.proj.weight": (1024, 1024),
        "blip.visual_encoder.blocks.0.mlp.fc1.weight": (4096, 1024), "blip.visual_encoder.norm.weight": (1024,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (30524, 768),
        "blip.text_encoder.embeddings.position_embeddings.weight": (512, 768),
        "blip.text_encoder.embeddings.LayerNorm.weight": (768,),
        "blip.text_encoder.encoder.layer.0.attention.self.query.weight": (768, 768),
        "blip.text_encoder.encoder.layer.0.attention.output.LayerNorm.bias": (768,),
        "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight": (768, 1024),
        "blip.text_encoder.encoder.layer.11.crossattention.self.value.weight": (768, 1024),
        "blip.text_encoder.encoder.layer.11.crossattention.output.dense.weight": (768, 768),
        "blip.text_encoder.encoder.layer.11.intermediate.dense.weight": (3072, 768),
        "blip.text_encoder.encoder.layer.11.output.dense.weight": (768, 3072),
        "blip.vision_proj.weight": (256, 1024), "blip.text_proj.weight": (256, 768),
        "mlp.layers.0.weight": (1024, 768), "mlp.layers.2.weight": (128, 1024), "mlp.layers.4.weight": (64, 128),
        "mlp.layers.6.weight": (16, 64), "mlp.layers.7.weight": (1, 16), "mlp.layers.7.bias": (1,)}
    assert {k: shapes.get(k) for k in expected} == expected
    # ViT 4 + 24 x 12 + 2; text 4 + 12 x 26; projections 4; MLP 10 (+ position_ids in the file)
    assert len(shapes) == 624
    assert not [k for k in shapes if "pooler" in k or "token_type" in k or ".head." in k]


def test_ir_text_encoder_matches_transformers_blip_text(imr):
    """Our med.py encoder == transformers' independent port (BlipTextModel) with the same weights."""
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    cfg = BlipTextConfig(vocab_size=TINY_IR.vocab_size, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40,
                         layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True, pad_token_id=0,
                         bos_token_id=len(VOCAB), sep_token_id=3, eos_token_id=3)
    ref = BlipTextModel(cfg, add_pooling_layer=False).eval()
    ref.load_state_dict(imr.net.blip.text_encoder.state_dict(), strict=True)
    ids, mask = imr.tokens(PROMPTS[:2] + ["cat"])
    image = torch.randn(3, 17, 32)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                   encoder_attention_mask=torch.ones(3, 17, dtype=torch.long)).last_hidden_state
        got = imr.net.blip.text_encoder(ids, mask, image)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ir_tokens_follow_reference(imr):
    tok = imr.tokenizer
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]
    assert len(tok) == TINY_IR.vocab_size
    ids, mask = imr.tokens(["A photo of a RED cat", " ".join(["dog"] * 50)])
    assert ids.shape == mask.shape == (2, ir.MAX_LENGTH)
    assert ids[0, :8].tolist() == [2, 5, 6, 7, 5, 8, 10, 3] and ids[0, 8:].eq(0).all()  # [CLS] first, no [ENC]
    assert mask[0].sum() == 8 and mask[1].all() and ids[1, -1] == 3  # truncated to 35 with [SEP] last


def test_ir_preprocessing_is_the_reference_transform(imr):
    from torchvision import transforms as T

    ref = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                     T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    for im in images((40, 24), (45, 31), (31, 45), (20, 20)):
        torch.testing.assert_close(clip_pixels(im[None], 32, crop_offset="round")[0], ref(Image.fromarray(im)))


def test_ir_normaliser_by_hand(imr):
    assert (ir.REWARD_MEAN, ir.REWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    batch = np.stack(images((40, 40), (40, 40), (40, 40), seed=3))
    got = [r.score for r in imr.score(batch, PROMPTS, [{}] * 3)]
    assert all(type(s) is float for s in got)
    ids, mask = imr.tokens(PROMPTS)
    with torch.no_grad():
        h = imr.net.features(clip_pixels(batch, 32, crop_offset="round"), ids, mask).double()
    for layer in imr.net.mlp.layers:  # Linear, Dropout (identity in eval), ...; no activations
        if isinstance(layer, torch.nn.Linear):
            h = h @ layer.weight.double().T + layer.bias.double()
    np.testing.assert_allclose(got, ((h[:, 0] - 0.16717362830052426) / 1.0333394966054072).numpy(), atol=1e-5)


def test_ir_deterministic_rgb_order_batching_and_prompt(imr):
    batch = np.stack(images((40, 40), (40, 40), (40, 40), seed=4))
    first = [r.score for r in imr.score(batch, PROMPTS, [{}] * 3)]
    assert first == [r.score for r in imr.score(batch, PROMPTS, [{}] * 3)]
    one_by_one = [imr.score(batch[i:i + 1], PROMPTS[i:i + 1], [{}])[0].score for i in range(3)]
    np.testing.assert_allclose(first, one_by_one, atol=1e-5)
    assert not np.allclose(first, [r.score for r in imr.score(batch[..., ::-1].copy(), PROMPTS, [{}] * 3)],
                           atol=1e-4)
    red, blue = (imr.score(solid(c), PROMPTS[:1], [{}])[0].score for c in ((255, 0, 0), (0, 0, 255)))
    assert abs(red - blue) > 1e-4
    same_image = np.repeat(batch[:1], 3, axis=0)
    scores = [r.score for r in imr.score(same_image, PROMPTS, [{}] * 3)]
    assert len({round(s, 6) for s in scores}) == 3  # the prompt changes the score
    with pytest.raises(ValueError, match="2 prompts"):
        imr.score(batch, PROMPTS[:2], [{}] * 3)


def test_ir_download_only_when_allowed(ir_files, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename: calls.append((repo_id, filename)) or ir_files["image_reward"])
    build_scorer("imagereward", checkpoints={**ir_files, "image_reward": None}, allow_download=True, arch=TINY_IR)
    assert calls == [("THUDM/ImageReward", "ImageReward.pt")]
