"""GenEval's mmdetection Mask2Former checkpoint into transformers: layout, strict load, and the pieces
whose tensors are rearranged compared against mmdetection's own computation."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch
from mmdet_layout import TINY, Arch, Mask2Former, mmdet_relative_position_index, random_mask2former, save_checkpoint

from soar.rewards.geneval_m2f import MMDET_CHECKPOINT
from soar.rewards.mmdet_mask2former import (
    MMDET_COCO_CLASSES,
    NOT_IN_CHECKPOINT,
    convert_state_dict,
    load_mmdet_mask2former,
    mask2former_config,
    rename,
    swin_relative_position_index,
    unfold_to_concat,
)

SWIN = "model.pixel_level_module.encoder.swin.encoder."


def _save(tmp_path, state_dict, meta=None, name="mask2former_swin-s.pth"):
    return save_checkpoint(tmp_path / name, state_dict, meta)


@pytest.fixture(scope="module")
def tiny():
    """A tiny mmdetection-layout model with random weights (LayerNorms too)."""
    return random_mask2former(TINY)


@pytest.fixture(scope="module")
def tiny_hf(tiny, tmp_path_factory):
    path = _save(tmp_path_factory.mktemp("mmdet"), tiny.state_dict())
    return load_mmdet_mask2former(path)


def test_swin_s_layout_at_real_size_converts_and_fits_strictly():
    """The real checkpoint's 649 tensors (68.8 M values, on the meta device): config read from shapes,
    every tensor mapped, every transformers parameter set, shapes equal."""
    from transformers import Mask2FormerForUniversalSegmentation

    with torch.device("meta"):
        state_dict = Mask2Former(Arch()).state_dict()
    assert len(state_dict) == 649 and round(sum(v.numel() for v in state_dict.values()) / 1e6, 1) == 68.8
    config = mask2former_config(state_dict, MMDET_COCO_CLASSES)
    sw = config.backbone_config
    assert (sw.embed_dim, sw.depths, sw.num_heads, sw.window_size, sw.patch_size, sw.mlp_ratio) == (
        96, [2, 2, 18, 2], [3, 6, 12, 24], 7, 4, 4.0)
    assert (config.feature_size, config.mask_feature_size, config.hidden_dim, config.num_queries) == (
        256, 256, 256, 100)
    assert (config.encoder_layers, config.encoder_feedforward_dim, config.decoder_layers, config.dim_feedforward,
            config.num_labels) == (6, 1024, 10, 2048, 80)
    with torch.device("meta"):
        model = Mask2FormerForUniversalSegmentation(config)
    converted = convert_state_dict(state_dict)
    own = model.state_dict()
    assert sorted(set(own) - set(converted)) == sorted(NOT_IN_CHECKPOINT)
    converted.update({k: own[k] for k in NOT_IN_CHECKPOINT})
    model.load_state_dict(converted, strict=True, assign=True)  # raises on any missing/unexpected/shape
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in own.items()}


def test_every_tensor_lands_where_its_module_is(tiny, tiny_hf):
    """Each mmdetection tensor, found in its transformers parameter (qkv and in_proj split in order)."""
    hf = tiny_hf.state_dict()
    checked = 0
    for name, value in tiny.state_dict().items():
        if name.endswith("relative_position_index"):
            continue
        target = rename(name)
        if "QKV" in target:
            parts = torch.cat([hf[target.replace("QKV", p)] for p in "qkv"])
            assert torch.equal(parts, value), name
        elif ".downsample." in target:
            assert torch.equal(hf[target], unfold_to_concat(value)) and not torch.equal(hf[target], value), name
        else:
            assert torch.equal(hf[target], value), name
        checked += 1
    assert checked == len(tiny.state_dict()) - sum(TINY.depths)
    # A few by hand, against the module structure rather than the rename table:
    h = tiny.panoptic_head
    m = tiny_hf.model.transformer_module.decoder
    assert torch.equal(m.layers[2].cross_attn_layer_norm.weight, h.transformer_decoder.layers[2].norms[0].weight)
    assert torch.equal(m.layers[2].self_attn_layer_norm.weight, h.transformer_decoder.layers[2].norms[1].weight)
    assert torch.equal(m.layers[1].final_layer_norm.bias, h.transformer_decoder.layers[1].norms[2].bias)
    cross = h.transformer_decoder.layers[0].attentions[0].attn
    assert torch.equal(m.layers[0].cross_attn.in_proj_weight, cross.in_proj_weight)
    assert torch.equal(m.mask_predictor.mask_embedder.get_submodule("2.0").weight, h.mask_embed[4].weight)
    assert torch.equal(tiny_hf.class_predictor.bias, h.cls_embed.bias)
    pix = tiny_hf.model.pixel_level_module
    assert torch.equal(pix.encoder.hidden_states_norms["stage4"].weight, tiny.backbone.norm3.weight)
    assert torch.equal(pix.decoder.level_embed, h.pixel_decoder.level_encoding.weight)
    assert torch.equal(pix.decoder.input_projections[0][0].weight, h.pixel_decoder.input_convs[0].conv.weight)
    assert pix.decoder.input_projections[0][0].in_channels == TINY.embed * 8  # coarsest level first, both sides
    assert torch.equal(pix.decoder.adapter_1[1].weight, h.pixel_decoder.lateral_convs[0].gn.weight)


def test_window_attention_equals_mmdetections(tiny, tiny_hf):
    """Fused qkv split, relative-position table and index: the same attention output, in float64."""
    mm = tiny.backbone.stages[2].blocks[1].attn.w_msa.double()
    hf = tiny_hf.model.pixel_level_module.encoder.swin.encoder.layers[2].blocks[1].attention.double()
    with torch.no_grad():
        mm.relative_position_bias_table.normal_()
        hf.relative_position_bias.relative_position_bias_table.copy_(mm.relative_position_bias_table)
        x = torch.randn(3, TINY.window ** 2, TINY.embed * 4, dtype=torch.float64)
        torch.testing.assert_close(hf(x)[0], mm(x), rtol=0, atol=1e-12)
    tiny.float(), tiny_hf.float()


def test_patch_merging_equals_mmdetections_unfold(tiny, tiny_hf):
    """mmdetection merges with nn.Unfold; transformers concatenates sub-grids: equal after conversion."""
    mm = tiny.backbone.stages[1].downsample.double()
    hf = tiny_hf.model.pixel_level_module.encoder.swin.encoder.layers[1].downsample.double()
    x = torch.randn(2, 6 * 4, TINY.embed * 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(hf(x, (6, 4)), mm(x, (6, 4)), rtol=0, atol=1e-12)
        hf.reduction.weight.copy_(mm.reduction.weight)  # unconverted: a different function
        hf.norm.weight.copy_(mm.norm.weight)
        hf.norm.bias.copy_(mm.norm.bias)
        assert (hf(x, (6, 4)) - mm(x, (6, 4))).abs().max() > 1e-3
    tiny.float(), tiny_hf.float()


def test_decoder_self_attention_equals_multihead_attention(tiny, tiny_hf):
    """mmcv's self-attention (nn.MultiheadAttention, q = k = x + pos, v = x) vs the split q/k/v."""
    mm = tiny.panoptic_head.transformer_decoder.layers[1].attentions[1].attn.double()
    hf = tiny_hf.model.transformer_module.decoder.layers[1].self_attn.double()
    x, pos = torch.randn(2, TINY.queries, 3, TINY.feat, dtype=torch.float64)  # [Q, B, C] each
    with torch.no_grad():
        torch.testing.assert_close(hf(x, position_embeddings=pos)[0], mm(x + pos, x + pos, x)[0], rtol=0, atol=1e-12)
    tiny.float(), tiny_hf.float()


def test_relative_position_index_formulas_agree_and_are_checked(tiny):
    for window in (2, 4, 7, 12):
        assert torch.equal(mmdet_relative_position_index(window), swin_relative_position_index(window))
    state_dict = dict(tiny.state_dict())
    key = "backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"
    state_dict[key] = state_dict[key].flip(0)
    with pytest.raises(ValueError, match=re.escape(key)):
        convert_state_dict(state_dict)


def test_converted_model_runs_and_is_deterministic(tiny_hf):
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = tiny_hf(pixel_values=x), tiny_hf(pixel_values=x)
    assert a.class_queries_logits.shape == (1, TINY.queries, 81)
    assert a.masks_queries_logits.shape == (1, TINY.queries, 16, 24)
    assert torch.equal(a.class_queries_logits, b.class_queries_logits)
    assert tiny_hf.config.id2label[65] == "remote" and not tiny_hf.training


def test_refuses_what_it_cannot_map_exactly(tiny, tmp_path):
    base = dict(tiny.state_dict())
    extra = {**base, "panoptic_head.decoder_input_projs.0.weight": torch.zeros(32, 32, 1, 1)}
    with pytest.raises(ValueError, match=r"no transformers counterpart: panoptic_head\.decoder_input_projs"):
        load_mmdet_mask2former(_save(tmp_path, extra))
    missing = {k: v for k, v in base.items() if k != "panoptic_head.transformer_decoder.layers.1.norms.2.bias"}
    with pytest.raises(ValueError, match=r"missing \['model\.transformer_module\.decoder\.layers\.1\.final_layer_norm"):
        load_mmdet_mask2former(_save(tmp_path, missing))
    key = "panoptic_head.pixel_decoder.encoder.layers.0.attentions.0.attention_weights.weight"
    points = {**base, key: torch.zeros(2 * 3 * 4 * 2, TINY.feat)}
    with pytest.raises(ValueError, match=r"8 heads x 3 levels x 4 points"):
        load_mmdet_mask2former(_save(tmp_path, points))
    resnet = {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}
    with pytest.raises(ValueError, match=r"expected mmdetection 2\.x Mask2Former with a Swin backbone"):
        load_mmdet_mask2former(_save(tmp_path, resnet))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable mmdetection checkpoint"):
        load_mmdet_mask2former(tmp_path / "junk.pth")


def test_class_names_come_from_the_checkpoint_meta(tiny, tmp_path):
    without_meta = load_mmdet_mask2former(_save(tmp_path, tiny.state_dict(), meta={}))
    assert tuple(without_meta.config.id2label[i] for i in range(80)) == MMDET_COCO_CLASSES
    renamed = ("human",) + MMDET_COCO_CLASSES[1:]
    model = load_mmdet_mask2former(_save(tmp_path, tiny.state_dict(), meta={"CLASSES": renamed}))
    assert model.config.id2label[0] == "human"


def test_the_scorer_loads_the_mmdet_file_and_detects(tiny, tmp_path):
    """``score.checkpoints.mask2former`` naming the .pth: the real loader converts it; GenEval's class names."""
    from soar.rewards.geneval_m2f import GENEVAL_CLASSES, Mask2FormerGenEval, load_detector

    path = _save(tmp_path, tiny.state_dict(), name=MMDET_CHECKPOINT)
    detector = load_detector({"mask2former": str(path), "clip_vit_l14": None})
    evaluator = Mask2FormerGenEval(detector, colors=None)
    assert evaluator.class_names == GENEVAL_CLASSES and evaluator.class_names[65] == "tv remote"
    with torch.no_grad():  # confident classes and sharp masks, so that instances pass 0.3
        detector.class_predictor.weight.mul_(40.0)
        detector.model.transformer_module.decoder.mask_predictor.mask_embedder.get_submodule("2.0").weight.mul_(40.0)
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    found = evaluator.instances(images)
    assert len(found) == 2 and sum(len(dets) for dets, _ in found) > 0
    for dets, masks in found:
        assert all(d.label in GENEVAL_CLASSES and d.score > 0.3 for d in dets)
        assert all(m.shape == (48, 40) for m in masks)
    again = evaluator.instances(images[1:])  # per-image results do not depend on the batch
    assert [d.score for d in again[0][0]] == pytest.approx([d.score for d in found[1][0]], abs=1e-5)


@pytest.mark.parametrize(("hw", "resized", "padded"), [((512, 512), (800, 800), (800, 800)),
                                                        ((512, 768), (800, 1200), (800, 1216)),
                                                        ((1024, 1024), (800, 800), (800, 800)),
                                                        ((37, 53), (800, 1146), (800, 1152))])
def test_detector_input_is_mmdets_test_pipeline(hw, resized, padded):
    """mmcv imrescale (cv2 bilinear on uint8, sizes rounded half up), imnormalize, zero pad to 32: against
    the steps written out with numpy in float64; PIL's bilinear (transformers' processors) differs."""
    from PIL import Image

    from soar.rewards.geneval_m2f import MMDET_MEAN, MMDET_STD, detector_input

    rng = np.random.default_rng(hw[0])
    images = rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    pixels, size = detector_input(images)
    assert size == resized and tuple(pixels.shape) == (2, 3, *padded) and pixels.dtype == torch.float32
    sh, sw = resized
    for image, ours in zip(images, pixels, strict=True):
        resized_u8 = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
        expected = (resized_u8.astype(np.float64) - np.float64(MMDET_MEAN)) / np.float64(MMDET_STD)
        np.testing.assert_allclose(ours[:, :sh, :sw].permute(1, 2, 0).numpy(), expected, rtol=0, atol=2e-6)
        assert not ours[:, sh:].any() and not ours[:, :, sw:].any()
        pil = np.asarray(Image.fromarray(image).resize((sw, sh), Image.Resampling.BILINEAR)).astype(np.int16)
        assert np.abs(pil - resized_u8.astype(np.int16)).max() >= 1
