"""ImageReward v1.0 (THUDM/ImageReward): BLIP ViT-L/16 image tokens, cross-attended by BLIP's BERT text
encoder; an MLP on the [CLS] output, normalised by the published mean/std (about 1.0 in the tables).

Reference: ImageReward/ImageReward.py (``ImageReward.score``, ``inference_rank``), BLIP_Pretrain
(``create_vit('large', 224)``, ``BertModel(med_config.json, add_pooling_layer=False)`` with
``encoder_width`` = the ViT width, plus ``vision_proj`` / ``text_proj``), BLIP's med.py and vit.py:

    reward = (mlp(text_encoder(ids, mask, encoder_hidden_states=vit(image))[:, 0]) - MEAN) / STD

- Text: the bert-base-uncased tokenizer plus BLIP's ``[DEC]`` bos and ``[ENC]`` special tokens
  (``init_tokenizer``; 30522 + 2 = 30524 ids), ``padding="max_length", truncation=True, max_length=35``.
  ImageReward feeds the ids as tokenised: unlike BLIP's ITM head it does *not* overwrite the first
  token with ``[ENC]`` (``enc_token_id`` is unused), so the sequence starts with ``[CLS]``.
- Image: Resize(224, bicubic) + CenterCrop(224) + ToTensor + Normalize(OpenAI CLIP mean/std), which
  ``images.clip_pixels(..., crop_offset="round")`` reproduces exactly.
- Weights: ``ImageReward.pt`` is the state dict of the ImageReward module, loaded here with
  ``strict=True`` after dropping ``blip.text_encoder.embeddings.position_ids`` (a constant arange
  buffer that med.py saves). ``blip.vision_proj`` / ``blip.text_proj`` (unused by the reward) are kept
  as modules so that the published keys match exactly.
- Vision: timm's ``VisionTransformer`` (BLIP's vit.py is timm's ViT: same key names, LayerNorm eps
  1e-6, exact GELU, qkv bias, no head). Text: the minimal med.py encoder below, because transformers'
  ``BertModel`` builds its cross-attention keys/values ``hidden_size`` wide, not ``encoder_width``.
- dtype: BLIP runs in ``dtype``; as in the reference, the [CLS] features go to the MLP in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from soar.rewards.base import Scorer, ScoreRecord, register
from soar.rewards.images import clip_pixels
from soar.rewards.weights import PARAM_PREFIX, fetch_file, import_extra, locate, torch_dtype

IMAGE_REWARD_HUB_ID = "THUDM/ImageReward"  # ImageReward/utils.py _MODELS["ImageReward-v1.0"]
IMAGE_REWARD_FILE = "ImageReward.pt"
TOKENIZER_HUB_ID = "bert-base-uncased"  # BLIP init_tokenizer
REWARD_MEAN = 0.16717362830052426  # ImageReward.__init__: self.mean
REWARD_STD = 1.0333394966054072  # ImageReward.__init__: self.std
MAX_LENGTH = 35  # ImageReward.score: tokenizer(..., max_length=35)
LAYER_NORM_EPS = 1e-12  # med_config.json (hidden_act "gelu", i.e. exact erf GELU)
MASK_VALUE = -10000.0  # med.py get_extended_attention_mask: (1 - mask) * -10000
MLP_DIMS = (1024, 128, 64, 16, 1)  # ImageReward.MLP(768): Linear widths after the input
MLP_DROPOUTS = (0.2, 0.2, 0.1, None, None)  # after each Linear; no activations
POSITION_IDS_KEY = "blip.text_encoder.embeddings.position_ids"


@dataclass(frozen=True)
class ImageRewardArch:
    """Network sizes; the defaults are the published v1.0 (BLIP ``vit='large'`` + med_config.json)."""

    image_size: int = 224  # BLIP_Pretrain(image_size=224, vit='large')
    patch_size: int = 16  # blip.create_vit('large'): patch 16, width 1024, depth 24, 16 heads
    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    vocab_size: int = 30524  # med_config.json
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    proj_dim: int = 256  # BLIP_Pretrain embed_dim (vision_proj / text_proj)


PUBLISHED_ARCH = ImageRewardArch()


class _AddNorm(nn.Module):
    """med.py BertSelfOutput / BertOutput: ``LayerNorm(dense(x) + residual)``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, d_out), nn.LayerNorm(d_out, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    """med.py BertAttention (``self.query/key/value``, ``output``); keys/values ``kv_width`` wide."""

    def __init__(self, width: int, heads: int, kv_width: int) -> None:
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query = nn.Linear(width, width)
        self.self.key, self.self.value = nn.Linear(kv_width, width), nn.Linear(kv_width, width)
        self.output = _AddNorm(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, L, D]``, additive ``mask [N, 1, 1, Lk]`` or None, ``context [N, Lk, kv_width]`` -> ``[N, L, D]``."""
        kv = x if context is None else context

        def split(t: torch.Tensor) -> torch.Tensor:  # [N, T, D] -> [N, heads, T, D / heads]
            return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(self.self.query(x)), split(self.self.key(kv)), split(self.self.value(kv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        return self.output(out, x)


class _Layer(nn.Module):
    """med.py BertLayer in 'multimodal' mode: self-attention, cross-attention to the image, MLP."""

    def __init__(self, a: ImageRewardArch) -> None:
        super().__init__()
        self.attention = _Attention(a.hidden_size, a.num_heads, a.hidden_size)
        self.crossattention = _Attention(a.hidden_size, a.num_heads, a.vision_width)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(a.hidden_size, a.intermediate_size)
        self.output = _AddNorm(a.intermediate_size, a.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.crossattention(self.attention(x, mask), None, image)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class TextEncoder(nn.Module):
    """BLIP's med.py ``BertModel(add_pooling_layer=False)`` (no token-type embeddings), state-dict compatible."""

    def __init__(self, a: ImageRewardArch) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size, padding_idx=0)
        self.embeddings.position_embeddings = nn.Embedding(a.max_position_embeddings, a.hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(a.hidden_size, eps=LAYER_NORM_EPS)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer(a) for _ in range(a.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """ids / 0-1 mask ``[N, L]``, image tokens ``[N, T, vision_width]`` -> hidden states ``[N, L, hidden]``."""
        e = self.embeddings
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = e.LayerNorm(e.word_embeddings(input_ids) + e.position_embeddings(pos))
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * MASK_VALUE
        for layer in self.encoder.layer:
            x = layer(x, mask, image)
        return x


class ImageRewardNet(nn.Module):
    """The ImageReward module's layout: ``blip.{visual_encoder, text_encoder, vision_proj, text_proj}``, ``mlp``."""

    def __init__(self, a: ImageRewardArch = PUBLISHED_ARCH) -> None:
        super().__init__()
        import_extra("timm", "imagereward")
        from timm.models.vision_transformer import VisionTransformer

        self.blip = nn.Module()
        self.blip.visual_encoder = VisionTransformer(
            img_size=a.image_size, patch_size=a.patch_size, embed_dim=a.vision_width, depth=a.vision_depth,
            num_heads=a.vision_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="")
        self.blip.text_encoder = TextEncoder(a)
        self.blip.vision_proj = nn.Linear(a.vision_width, a.proj_dim)
        self.blip.text_proj = nn.Linear(a.hidden_size, a.proj_dim)
        self.mlp = nn.Module()
        layers, d_in = [], a.hidden_size
        for d_out, p in zip(MLP_DIMS, MLP_DROPOUTS, strict=True):
            layers += [nn.Linear(d_in, d_out)] + ([nn.Dropout(p)] if p is not None else [])
            d_in = d_out
        self.mlp.layers = nn.Sequential(*layers)

    def features(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """pixels ``[N, 3, S, S]``, ids / mask ``[N, L]`` -> float32 [CLS] output ``[N, hidden]``."""
        image = self.blip.visual_encoder.forward_features(pixels)  # [N, 1 + (S / patch)^2, vision_width]
        return self.blip.text_encoder(input_ids, attention_mask, image)[:, 0].float()

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> float32 normalised rewards ``[N]``."""
        raw = self.mlp.layers(self.features(pixels, input_ids, attention_mask))[:, 0]
        return (raw - REWARD_MEAN) / REWARD_STD


def load_image_reward(path: str, arch: ImageRewardArch = PUBLISHED_ARCH, key: str = "image_reward") -> ImageRewardNet:
    """The network with the state dict file ``path`` (strict; built on the meta device, weights assigned)."""
    state = dict(torch.load(path, map_location="cpu", weights_only=True))
    pos = state.pop(POSITION_IDS_KEY, None)
    if pos is not None and not torch.equal(pos.flatten().long(), torch.arange(pos.numel())):
        raise ValueError(f"{PARAM_PREFIX}.{key}: {path}: {POSITION_IDS_KEY} is not 0..{pos.numel() - 1}")
    with torch.device("meta"):
        net = ImageRewardNet(arch)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{PARAM_PREFIX}.{key}: {path} is not an ImageReward state dict for {arch}: {exc}") from exc
    if any(t.is_meta for t in chain(net.parameters(), net.buffers())):
        raise RuntimeError(f"{PARAM_PREFIX}.{key}: tensors left unloaded from {path}")
    return net.eval().requires_grad_(False)


def load_blip_tokenizer(path: str) -> Any:
    """bert-base-uncased tokenizer from ``path`` with BLIP's ``[DEC]`` bos and ``[ENC]`` tokens added."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardScorer(Scorer):
    """ImageReward v1.0; one batched ViT + text-encoder forward per call."""

    name = "imagereward"

    def __init__(self, net: ImageRewardNet, tokenizer: Any, image_size: int) -> None:
        self.net, self.tokenizer, self.image_size = net, tokenizer, image_size
        vocab = net.blip.text_encoder.embeddings.word_embeddings.num_embeddings
        if len(tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids but the text encoder only {vocab}")
        self.device, self.dtype = net.blip.vision_proj.weight.device, net.blip.vision_proj.weight.dtype

    def tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """N prompts -> ``(input_ids, attention_mask)`` int64 ``[N, 35]`` (padded, truncated, [CLS] first)."""
        t = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                           return_tensors="pt")
        return t["input_ids"], t["attention_mask"]

    def rewards(self, images: np.ndarray, prompts: Sequence[str]) -> torch.Tensor:
        """uint8 RGB ``[N, H, W, 3]`` and N prompts -> float32 rewards ``[N]``."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = clip_pixels(images, self.image_size, crop_offset="round").to(self.device, self.dtype)
        ids, mask = (t.to(self.device) for t in self.tokens(prompts))
        with torch.inference_mode():
            return self.net(pixels, ids, mask)

    def score(self, images: np.ndarray, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any]]) -> list[ScoreRecord]:
        if len(images) == 0:
            return []
        return [ScoreRecord(float(r)) for r in self.rewards(images, prompts).cpu().tolist()]


@register("imagereward")
def build_imagereward(*, checkpoints: Mapping[str, str | None], allow_download: bool = False, device: str = "cpu",
                      dtype: str = "float32", arch: ImageRewardArch = PUBLISHED_ARCH) -> ImageRewardScorer:
    """ImageReward from ``score.checkpoints.image_reward`` (ImageReward.pt) and ``...image_reward_tokenizer``."""
    located = locate(checkpoints, "image_reward", hub_id=IMAGE_REWARD_HUB_ID, allow_download=allow_download,
                     what=IMAGE_REWARD_FILE)
    tokenizer = locate(checkpoints, "image_reward_tokenizer", expect=["vocab.txt"], hub_id=TOKENIZER_HUB_ID,
                       allow_download=allow_download, what="the bert-base-uncased tokenizer")
    net = load_image_reward(fetch_file(located, IMAGE_REWARD_HUB_ID, IMAGE_REWARD_FILE), arch)
    net.blip.to(device=device, dtype=torch_dtype(dtype))
    net.mlp.to(device=device, dtype=torch.float32)
    return ImageRewardScorer(net, load_blip_tokenizer(tokenizer), arch.image_size)
