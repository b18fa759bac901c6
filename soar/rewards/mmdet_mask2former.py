"""GenEval's detector checkpoint, mmdetection 2.x Mask2Former, loaded into transformers' Mask2Former.

The GenEval protocol scores with ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`` (Swin-S backbone,
multi-scale deformable-attention pixel decoder, masked-attention decoder; COCO instances), a file
written by mmdetection 2.x: ``{"meta": {..., "CLASSES": (...)}, "state_dict": {name: tensor}}``.
transformers implements the same network; this module renames and rearranges the mmdetection state
dict into ``Mask2FormerForUniversalSegmentation``'s and loads it strictly (every tensor used, every
parameter set, shapes equal). Layouts, from mmdetection's and mmcv's module definitions:

- Swin (``backbone.*``): ``stages.i.blocks.j.{norm1, norm2}``, ``attn.w_msa.{qkv, proj,
  relative_position_bias_table, relative_position_index}``, ``ffn.layers.{0.0, 1}``,
  ``stages.i.downsample.{norm, reduction}``, per-output ``norm{i}``, ``patch_embed.{projection, norm}``.
  The fused ``qkv`` splits into q, k, v (rows in that order). mmdetection merges patches with
  ``nn.Unfold`` (channel-major, then the 2 x 2 positions row-major) where Swin and transformers
  concatenate the four sub-grids ``(0,0), (1,0), (0,1), (1,1)``: ``unfold_to_concat`` permutes the
  merge norm and the reduction's input columns back (the inverse of mmdetection's own converter).
  The stored ``relative_position_index`` must equal Swin's formula; it is checked, not copied.
- Pixel decoder (``panoptic_head.pixel_decoder.*``): ``input_convs.k.{conv, gn}`` (k = 0 the coarsest
  level, as transformers' ``input_projections``), ``encoder.layers.l.attentions.0.*`` (deformable
  attention, same four linears), ``norms.{0, 1}``, ``ffns.0.layers.{0.0, 1}``, ``level_encoding``,
  ``lateral_convs.i`` / ``output_convs.i`` (the backbone level i below the encoder's: ``adapter_{i+1}``
  / ``layer_{i+1}``), ``mask_feature``.
- Decoder (``panoptic_head.*``): ``transformer_decoder.layers.l.attentions.{0: cross, 1: self}.attn``
  (``nn.MultiheadAttention``), ``norms.{0: cross, 1: self, 2: ffn}``, ``ffns.0``, ``post_norm``,
  ``query_embed``, ``query_feat``, ``level_embed``, ``cls_embed`` (80 classes + no object),
  ``mask_embed.{0, 2, 4}``.

The architecture is read from the tensors' shapes (widths, depths, heads, window, queries, classes);
what shapes cannot tell is mmdetection's config: 8 decoder heads, 3 feature levels, 4 sampling points.
Two tensors of the transformers model are not weights of the network and are taken from the model
built from the config: ``criterion.empty_weight`` (the training loss's class weights) and
``swin.layernorm`` (SwinModel's pooling norm, which the backbone's forward never applies).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

# mmdetection 2.x CocoDataset.CLASSES, the detector's class order (the checkpoint's meta repeats it).
MMDET_COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
DECODER_HEADS = 8  # mmdet config: transformer_decoder attn_cfgs.num_heads (and the pixel decoder's)
FEATURE_LEVELS = 3  # mmdet config: num_transformer_feat_level / attn_cfgs.num_levels
SAMPLING_POINTS = 4  # mmdet config: MultiScaleDeformableAttention num_points
NOT_IN_CHECKPOINT = ("criterion.empty_weight", "model.pixel_level_module.encoder.swin.layernorm.weight",
                     "model.pixel_level_module.encoder.swin.layernorm.bias")

SWIN, PIX, TR = "model.pixel_level_module.encoder.swin.", "model.pixel_level_module.", "model.transformer_module."
# Prefixes: an mmdetection Swin block / pixel-decoder encoder layer / decoder layer and their counterparts.
BLOCK, HF_BLOCK = r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.", SWIN + r"encoder.layers.\1.blocks.\2."
PD = r"panoptic_head\.pixel_decoder\."
ENC, HF_ENC = PD + r"encoder\.layers\.(\d+)\.", PIX + r"decoder.encoder.layers.\1."
DEC, HF_DEC = r"panoptic_head\.transformer_decoder\.layers\.(\d+)\.", TR + r"decoder.layers.\1."
FC1, FC2 = r"ffns\.0\.layers\.0\.0\.(.+)", r"ffns\.0\.layers\.1\.(.+)"  # a layer's mmcv FFN: its two Linears
# (mmdetection name pattern, transformers name template); the first full match wins.
RENAMES: tuple[tuple[str, str], ...] = (
    (r"backbone\.patch_embed\.projection\.(.+)", SWIN + r"embeddings.patch_embeddings.projection.\1"),
    (r"backbone\.patch_embed\.norm\.(.+)", SWIN + r"embeddings.norm.\1"),
    (BLOCK + r"norm1\.(.+)", HF_BLOCK + r"layernorm_before.\3"),
    (BLOCK + r"norm2\.(.+)", HF_BLOCK + r"layernorm_after.\3"),
    (BLOCK + r"attn\.w_msa\.relative_position_bias_table",
     HF_BLOCK + "attention.relative_position_bias.relative_position_bias_table"),
    (BLOCK + r"attn\.w_msa\.qkv\.(.+)", HF_BLOCK + r"attention.{q,k,v}_proj.\3"),
    (BLOCK + r"attn\.w_msa\.proj\.(.+)", HF_BLOCK + r"attention.o_proj.\3"),
    (BLOCK + r"ffn\.layers\.0\.0\.(.+)", HF_BLOCK + r"mlp.fc1.\3"),
    (BLOCK + r"ffn\.layers\.1\.(.+)", HF_BLOCK + r"mlp.fc2.\3"),
    (r"backbone\.stages\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)",
     SWIN + r"encoder.layers.\1.downsample.\2"),
    (r"backbone\.norm(\d+)\.(.+)", PIX + r"encoder.hidden_states_norms.stage{\1+1}.\2"),
    (PD + r"input_convs\.(\d+)\.conv\.(.+)", PIX + r"decoder.input_projections.\1.0.\2"),
    (PD + r"input_convs\.(\d+)\.gn\.(.+)", PIX + r"decoder.input_projections.\1.1.\2"),
    (ENC + r"attentions\.0\.(.+)", HF_ENC + r"self_attn.\2"),
    (ENC + r"norms\.0\.(.+)", HF_ENC + r"self_attn_layer_norm.\2"),
    (ENC + r"norms\.1\.(.+)", HF_ENC + r"final_layer_norm.\2"),
    (ENC + FC1, HF_ENC + r"fc1.\2"),
    (ENC + FC2, HF_ENC + r"fc2.\2"),
    (PD + r"level_encoding\.weight", PIX + "decoder.level_embed"),
    (PD + r"lateral_convs\.(\d+)\.conv\.(.+)", PIX + r"decoder.adapter_{\1+1}.0.\2"),
    (PD + r"lateral_convs\.(\d+)\.gn\.(.+)", PIX + r"decoder.adapter_{\1+1}.1.\2"),
    (PD + r"output_convs\.(\d+)\.conv\.(.+)", PIX + r"decoder.layer_{\1+1}.0.\2"),
    (PD + r"output_convs\.(\d+)\.gn\.(.+)", PIX + r"decoder.layer_{\1+1}.1.\2"),
    (PD + r"mask_feature\.(.+)", PIX + r"decoder.mask_projection.\1"),
    (DEC + r"attentions\.0\.attn\.(.+)", HF_DEC + r"cross_attn.\2"),
    (DEC + r"attentions\.1\.attn\.in_proj_(weight|bias)", HF_DEC + r"self_attn.{q,k,v}_proj.\2"),
    (DEC + r"attentions\.1\.attn\.out_proj\.(.+)", HF_DEC + r"self_attn.out_proj.\2"),
    (DEC + r"norms\.0\.(.+)", HF_DEC + r"cross_attn_layer_norm.\2"),
    (DEC + r"norms\.1\.(.+)", HF_DEC + r"self_attn_layer_norm.\2"),
    (DEC + r"norms\.2\.(.+)", HF_DEC + r"final_layer_norm.\2"),
    (DEC + FC1, HF_DEC + r"fc1.\2"),
    (DEC + FC2, HF_DEC + r"fc2.\2"),
    (r"panoptic_head\.transformer_decoder\.post_norm\.(.+)", TR + r"decoder.layernorm.\1"),
    (r"panoptic_head\.query_embed\.weight", TR + "queries_embedder.weight"),
    (r"panoptic_head\.query_feat\.weight", TR + "queries_features.weight"),
    (r"panoptic_head\.level_embed\.weight", TR + "level_embed.weight"),
    (r"panoptic_head\.mask_embed\.(0|2|4)\.(.+)", TR + r"decoder.mask_predictor.mask_embedder.{\1//2}.0.\2"),
    (r"panoptic_head\.cls_embed\.(.+)", r"class_predictor.\1"),
)
_RENAMES = tuple((re.compile(p), t) for p, t in RENAMES)
INDEX_KEY = re.compile(r"backbone\.stages\.\d+\.blocks\.\d+\.attn\.w_msa\.relative_position_index")


def unfold_to_concat(x: torch.Tensor) -> torch.Tensor:
    """Patch-merge tensor over ``4C`` inputs (last dim) from ``nn.Unfold`` order (index ``4 c + j``,
    ``j`` = row-major 2 x 2 position) to Swin's concatenation order (index ``C k + c``, ``k`` over the
    sub-grids (0,0), (1,0), (0,1), (1,1)). ``[..., 4C] -> [..., 4C]``."""
    c = x.shape[-1] // 4
    return x.reshape(*x.shape[:-1], c, 4).transpose(-1, -2)[..., [0, 2, 1, 3], :].reshape(x.shape)


def swin_relative_position_index(window: int) -> torch.Tensor:
    """Swin's ``[window**2, window**2]`` index into the ``(2 window - 1)**2`` relative-bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _target(template: str, match: re.Match) -> str:
    """Expand ``template``; ``{N+1}`` and ``{N//2}`` become the numbers (mmdet counts from 0, or
    skips the ReLUs of a Sequential, where transformers counts differently)."""
    name = match.expand(template.replace("{q,k,v}", "QKV"))
    name = re.sub(r"\{(\d+)\+1\}", lambda m: str(int(m.group(1)) + 1), name)
    return re.sub(r"\{(\d+)//2\}", lambda m: str(int(m.group(1)) // 2), name)


def rename(name: str) -> str | None:
    """The transformers name of mmdetection tensor ``name`` (``QKV`` marks a fused q/k/v); None: unknown."""
    for pattern, template in _RENAMES:
        match = pattern.fullmatch(name)
        if match:
            return _target(template, match)
    return None


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdetection Mask2Former tensors -> transformers names (module docstring). Raises ``ValueError``
    naming every tensor no rule maps, and a ``relative_position_index`` unequal to Swin's."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, value in state_dict.items():
        if INDEX_KEY.fullmatch(name):
            window = math.isqrt(value.shape[0])
            if not torch.equal(value.long().cpu(), swin_relative_position_index(window)):
                raise ValueError(f"{name}: not Swin's relative position index for window {window}")
            continue
        target = rename(name)
        if target is None:
            unknown.append(name)
        elif "QKV" in target:
            for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[target.replace("QKV", part)] = chunk.contiguous()
        elif ".downsample." in target:
            out[target] = unfold_to_concat(value).contiguous()
        else:
            out[target] = value
    if unknown:
        raise ValueError(f"{len(unknown)} tensors have no transformers counterpart: {', '.join(unknown[:8])}")
    return out


def _count(state_dict: Mapping[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def mask2former_config(state_dict: Mapping[str, torch.Tensor], class_names: tuple[str, ...]) -> Any:
    """The ``Mask2FormerConfig`` of an mmdetection state dict, read from its shapes."""
    from transformers import Mask2FormerConfig, SwinConfig

    sd, stages = state_dict, _count(state_dict, r"backbone\.stages\.(\d+)\..+")
    embed = sd["backbone.patch_embed.projection.weight"].shape[0]
    depths = [_count(sd, rf"backbone\.stages\.{i}\.blocks\.(\d+)\..+") for i in range(stages)]
    tables = [sd[f"backbone.stages.{i}.blocks.0.attn.w_msa.relative_position_bias_table"] for i in range(stages)]
    window = (math.isqrt(tables[0].shape[0]) + 1) // 2
    swin = SwinConfig(
        embed_dim=embed, depths=depths, num_heads=[t.shape[1] for t in tables], window_size=window,
        patch_size=sd["backbone.patch_embed.projection.weight"].shape[-1],
        mlp_ratio=sd["backbone.stages.0.blocks.0.ffn.layers.0.0.weight"].shape[0] / embed,
        out_features=[f"stage{i + 1}" for i in range(stages)])
    head = "panoptic_head."
    feature = sd[head + "pixel_decoder.input_convs.0.conv.weight"].shape[0]
    return Mask2FormerConfig(
        backbone_config=swin, use_pretrained_backbone=False, feature_size=feature,
        mask_feature_size=sd[head + "pixel_decoder.mask_feature.weight"].shape[0],
        hidden_dim=sd[head + "query_feat.weight"].shape[1], num_queries=sd[head + "query_feat.weight"].shape[0],
        encoder_layers=_count(sd, r"panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\..+"),
        encoder_feedforward_dim=sd[head + "pixel_decoder.encoder.layers.0.ffns.0.layers.0.0.weight"].shape[0],
        decoder_layers=_count(sd, r"panoptic_head\.transformer_decoder\.layers\.(\d+)\..+") + 1,  # + the query init
        dim_feedforward=sd[head + "transformer_decoder.layers.0.ffns.0.layers.0.0.weight"].shape[0],
        num_attention_heads=DECODER_HEADS, num_labels=len(class_names),
        id2label=dict(enumerate(class_names)), label2id={n: i for i, n in enumerate(class_names)})


def check_deformable_attention(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse pixel decoders whose deformable attention is not 8 heads x 3 levels x 4 points."""
    key = "panoptic_head.pixel_decoder.encoder.layers.0.attentions.0.attention_weights.weight"
    want = DECODER_HEADS * FEATURE_LEVELS * SAMPLING_POINTS
    if key in state_dict and state_dict[key].shape[0] != want:
        raise ValueError(f"{key}: {state_dict[key].shape[0]} rows; transformers' Mask2Former has "
                         f"{DECODER_HEADS} heads x {FEATURE_LEVELS} levels x {SAMPLING_POINTS} points = {want}")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """An mmdetection checkpoint file -> (state dict, class names from its meta, else COCO's)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable mmdetection checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a dict with 'state_dict', got {type(ckpt).__name__}")
    state_dict = ckpt.get("state_dict", ckpt)
    classes = (ckpt.get("meta") or {}).get("CLASSES") or MMDET_COCO_CLASSES
    if "backbone.patch_embed.projection.weight" not in state_dict:
        raise ValueError(f"{path}: no backbone.patch_embed.projection.weight; expected mmdetection 2.x "
                         "Mask2Former with a Swin backbone (mask2former_swin-*)")
    return dict(state_dict), tuple(str(c) for c in classes)


def load_mmdet_mask2former(path: str | Path, *, build: Callable[[Any], Any] | None = None) -> Any:
    """``Mask2FormerForUniversalSegmentation`` (eval) holding the mmdetection checkpoint at ``path``,
    loaded strictly; ``build`` (config -> model) defaults to transformers' constructor."""
    from transformers import Mask2FormerForUniversalSegmentation

    state_dict, classes = read_checkpoint(path)
    check_deformable_attention(state_dict)
    try:
        config = mask2former_config(state_dict, classes)
    except KeyError as err:
        raise ValueError(f"{path}: lacks {err.args[0]}; expected mmdetection 2.x Mask2Former (Swin)") from err
    model = (build or Mask2FormerForUniversalSegmentation)(config)
    converted = convert_state_dict(state_dict)
    own = model.state_dict()
    converted.update({k: own[k] for k in NOT_IN_CHECKPOINT if k in own})
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in converted.items()
           if k in own and v.shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(converted)), sorted(set(converted) - set(own))
    if bad or missing or unexpected:
        raise ValueError(f"{path}: does not fit transformers' Mask2Former: shapes {bad[:3]}, "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(converted, strict=True)
    return model.eval()
