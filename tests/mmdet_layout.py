"""mmdetection 2.x's Mask2Former (Swin) as bare modules: the attribute names, nesting and tensor shapes of
the real checkpoint, from mmdetection's ``SwinTransformer``, ``MSDeformAttnPixelDecoder`` and
``Mask2FormerHead`` with mmcv 1.x's ``BaseTransformerLayer`` / ``FFN`` / ``ConvModule`` /
``MultiScaleDeformableAttention``, so that ``state_dict()`` has the checkpoint's exact keys. Forwards
only where a test compares one piece with transformers (window attention, patch merging)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    embed: int = 96  # Swin-S, mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco
    depths: tuple[int, ...] = (2, 2, 18, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    window: int = 7
    patch: int = 4
    feat: int = 256  # pixel decoder / decoder width
    enc_layers: int = 6
    enc_ffn: int = 1024
    dec_layers: int = 9
    dec_ffn: int = 2048
    dec_heads: int = 8
    points: int = 4
    queries: int = 100
    classes: int = 80


TINY = Arch(embed=8, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window=4, feat=32, enc_layers=2, enc_ffn=48,
            dec_layers=3, dec_ffn=40, queries=12)


def mmdet_relative_position_index(window: int, device: str = "cpu") -> torch.Tensor:
    """mmdetection ``WindowMSA``'s index: ``double_step_seq`` summed with its transpose, flipped."""
    seq = (torch.arange(0, (2 * window - 1) * window, 2 * window - 1, device=device)[:, None]
           + torch.arange(window, device=device)[None, :]).reshape(1, -1)
    return (seq + seq.T).flip(1).contiguous()


class FFN(nn.Module):  # mmcv FFN, num_fcs=2: layers = [Sequential(Linear, act, Dropout), Linear, Dropout]
    def __init__(self, dims: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dims, hidden), nn.ReLU(), nn.Dropout(0.0)),
                                    nn.Linear(hidden, dims), nn.Dropout(0.0))


class WindowMSA(nn.Module):
    def __init__(self, dims: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", mmdet_relative_position_index(window))
        self.qkv = nn.Linear(dims, dims * 3)
        self.proj = nn.Linear(dims, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """mmdetection's unmasked window attention, ``[B, N, C] -> [B, N, C]``."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = (attn + bias.permute(2, 0, 1)[None]).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ShiftWindowMSA(nn.Module):
    def __init__(self, dims: int, heads: int, window: int) -> None:
        super().__init__()
        self.w_msa = WindowMSA(dims, heads, window)


class SwinBlock(nn.Module):
    def __init__(self, dims: int, heads: int, window: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dims), ShiftWindowMSA(dims, heads, window)
        self.norm2, self.ffn = nn.LayerNorm(dims), FFN(dims, 4 * dims)


class PatchMerging(nn.Module):  # mmcv PatchMerging: nn.Unfold(2, 2), LN(4C), Linear(4C, 2C, bias=False)
    def __init__(self, dims: int) -> None:
        super().__init__()
        self.sampler = nn.Unfold(kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(4 * dims)
        self.reduction = nn.Linear(4 * dims, 2 * dims, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """``[B, H*W, C] -> [B, H*W/4, 2C]`` (H, W even), as mmcv's forward."""
        b, _, c = x.shape
        x = self.sampler(x.view(b, *hw, c).permute(0, 3, 1, 2)).transpose(1, 2)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dims: int, depth: int, heads: int, window: int, last: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dims, heads, window) for _ in range(depth))
        self.downsample = None if last else PatchMerging(dims)


class PatchEmbed(nn.Module):
    def __init__(self, dims: int, patch: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, dims, patch, patch)
        self.norm = nn.LayerNorm(dims)


class SwinTransformer(nn.Module):
    def __init__(self, a: Arch) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(a.embed, a.patch)
        dims = [a.embed * 2 ** i for i in range(len(a.depths))]
        self.stages = nn.ModuleList(SwinStage(d, n, h, a.window, i == len(dims) - 1)
                                    for i, (d, n, h) in enumerate(zip(dims, a.depths, a.heads, strict=True)))
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(d))


class ConvModule(nn.Module):  # mmcv ConvModule with GN: conv (bias unless told), gn
    def __init__(self, cin: int, cout: int, k: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
        self.gn = nn.GroupNorm(32, cout)


class MultiScaleDeformableAttention(nn.Module):
    def __init__(self, dims: int, heads: int, levels: int, points: int) -> None:
        super().__init__()
        self.sampling_offsets = nn.Linear(dims, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dims, heads * levels * points)
        self.value_proj, self.output_proj = nn.Linear(dims, dims), nn.Linear(dims, dims)


class TransformerLayer(nn.Module):  # mmcv BaseTransformerLayer: attentions / ffns / norms in operation order
    def __init__(self, attentions: list[nn.Module], dims: int, hidden: int) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(attentions)
        self.ffns = nn.ModuleList([FFN(dims, hidden)])
        self.norms = nn.ModuleList(nn.LayerNorm(dims) for _ in range(len(attentions) + 1))


class MultiheadAttention(nn.Module):  # mmcv MultiheadAttention wraps nn.MultiheadAttention as .attn
    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dims, heads)


class Encoder(nn.Module):
    def __init__(self, a: Arch) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer([MultiScaleDeformableAttention(a.feat, a.dec_heads, 3, a.points)], a.feat, a.enc_ffn)
            for _ in range(a.enc_layers))


class PixelDecoder(nn.Module):
    def __init__(self, a: Arch) -> None:
        super().__init__()
        chans = [a.embed * 2 ** i for i in range(len(a.depths))]
        self.input_convs = nn.ModuleList(ConvModule(c, a.feat, 1, True) for c in chans[::-1][:3])
        self.encoder = Encoder(a)
        self.level_encoding = nn.Embedding(3, a.feat)
        self.lateral_convs = nn.ModuleList(ConvModule(c, a.feat, 1, False) for c in chans[:-3][::-1])
        self.output_convs = nn.ModuleList(ConvModule(a.feat, a.feat, 3, False) for _ in chans[:-3])
        self.mask_feature = nn.Conv2d(a.feat, a.feat, 1)


class Decoder(nn.Module):  # DetrTransformerDecoder: operation_order cross_attn, norm, self_attn, norm, ffn, norm
    def __init__(self, a: Arch) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer([MultiheadAttention(a.feat, a.dec_heads), MultiheadAttention(a.feat, a.dec_heads)],
                             a.feat, a.dec_ffn) for _ in range(a.dec_layers))
        self.post_norm = nn.LayerNorm(a.feat)


class Mask2FormerHead(nn.Module):
    def __init__(self, a: Arch) -> None:
        super().__init__()
        self.pixel_decoder, self.transformer_decoder = PixelDecoder(a), Decoder(a)
        self.query_embed, self.query_feat = nn.Embedding(a.queries, a.feat), nn.Embedding(a.queries, a.feat)
        self.level_embed = nn.Embedding(3, a.feat)
        self.cls_embed = nn.Linear(a.feat, a.classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(a.feat, a.feat), nn.ReLU(), nn.Linear(a.feat, a.feat), nn.ReLU(),
                                        nn.Linear(a.feat, a.feat))


class Mask2Former(nn.Module):
    def __init__(self, a: Arch = Arch()) -> None:
        super().__init__()
        self.backbone, self.panoptic_head = SwinTransformer(a), Mask2FormerHead(a)


def random_mask2former(arch: Arch = TINY, seed: int = 0) -> Mask2Former:
    """A model in the layout with random weights, its LayerNorm / GroupNorm affines random too (eval)."""
    torch.manual_seed(seed)
    model = Mask2Former(arch).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"norm|gn", name):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return model


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """An mmdetection 2.x checkpoint file: ``{"meta": {..., "CLASSES"}, "state_dict"}``."""
    from soar.rewards.mmdet_mask2former import MMDET_COCO_CLASSES

    meta = {"CLASSES": MMDET_COCO_CLASSES, "mmdet_version": "2.25.0"} if meta is None else meta
    torch.save({"meta": meta, "state_dict": state_dict}, path)
    return path
