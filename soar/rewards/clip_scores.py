"""CLIP-based scorers (transformers ``CLIPModel``): ClipScore, PickScore, LAION aesthetic.

All three load through ``load_clip`` (one path: ``CLIPModel.from_pretrained`` in eval mode on the
configured device/dtype, ``CLIPTokenizer`` and the folder's preprocessor config: sizes, mean/std) and
preprocess images as their reference does (``soar.rewards.images``, chosen once at load):

- ``clipscore``: cosine(text, image) of openai/clip-vit-large-patch14 (~0.29 in the tables). Images
  as Flow-GRPO's clip_scorer.py: torchvision ``Resize`` (bilinear, antialias) / ``CenterCrop`` /
  ``Normalize`` on the float [0, 1] batch (``"torchvision_float"``). Flow-GRPO's reward is
  ``logit_scale.exp() * cosine / 30`` (100 / 30 times the cosine for this model) and pads prompts to
  77 tokens; we report the cosine, as the tables do, and pad to the longest prompt (the causal text
  model pools at the first end token, which no padding reaches: equal to float rounding).
- ``pickscore``: ``logit_scale.exp() * cosine`` of PickScore_v1 (~22 in the tables); images as
  transformers' PIL-backend ``CLIPImageProcessorPil`` (``"transformers_pil"``), the processor
  PickScore's model card and Flow-GRPO's pickscore_scorer.py use.
- ``aesthetic``: LAION improved aesthetic predictor, an MLP on the L2-normalised ViT-L/14 image
  embedding (~5.4); prompt-free; images as ``pickscore``. ``AestheticScorer.predict`` is a
  ``soar.data.prepare`` quality_fn.

A call runs one image forward for all its images and one text forward for its distinct prompts
(truncated to the model's 77 tokens). Embeddings are L2-normalised in float32 whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from soar.rewards.base import Scorer, ScoreRecord, register
from soar.rewards.images import CLIP_TRANSFORMS, ClipTransform, Images, clip_transform
from soar.rewards.weights import PARAM_PREFIX, locate, torch_dtype

# Hub ids: docs/method.md#preference-and-quality-scores (ClipScore / Aesthetic backbone; PickScore model
# and processor per the PickScore_v1 model card and Flow-GRPO's pickscore_scorer.py).
CLIP_VIT_L14_HUB_ID = "openai/clip-vit-large-patch14"
PICKSCORE_HUB_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# LAION improved aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-predictor,
# simple_inference.py): weights file in the repository root, MLP(768) on CLIP ViT-L/14 embeddings.
AESTHETIC_MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_MLP_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                     + AESTHETIC_MLP_FILE)
AESTHETIC_EMBED_DIM = 768
AESTHETIC_MLP_DIMS = (AESTHETIC_EMBED_DIM, 1024, 128, 64, 16, 1)  # Linear widths, in order
AESTHETIC_MLP_DROPOUTS = (0.2, 0.2, 0.1, None, None)  # after each Linear (None: no Dropout)
# The published state dict: nn.Sequential index of each Linear -> weight/bias shapes.
AESTHETIC_MLP_LAYOUT = {
    "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
    "layers.4.weight": (64, 128), "layers.4.bias": (64,),
    "layers.6.weight": (16, 64), "layers.6.bias": (16,),
    "layers.7.weight": (1, 16), "layers.7.bias": (1,),
}
MODEL_FILES = ("config.json",)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # a model folder holds one of these
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer_config.json")
CLIPSCORE_PREPROCESSING = "torchvision_float"  # Flow-GRPO's clip_scorer.py: torchvision on float tensors


def _features(out: Any) -> torch.Tensor:
    """Projected embeddings from ``get_*_features``: a tensor (transformers 4) or ``.pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


@dataclass
class ClipEncoder:
    """A ``CLIPModel`` (eval, no grad) with its tokenizer (None: images only) and image preprocessing:
    the processor config's sizes and mean/std, applied as reference ``preprocessing`` does
    (``images.CLIP_TRANSFORMS``; the function is built once, here)."""

    model: Any
    tokenizer: Any
    size: int  # shorter side after resize
    crop: int  # centre crop side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: Image.Resampling  # PIL resampling of the PIL references
    preprocessing: str = "transformers_pil"  # one of images.CLIP_TRANSFORMS
    pixels: ClipTransform = field(init=False, repr=False)  # (images, device) -> model input, from the above

    def __post_init__(self) -> None:
        self.pixels = clip_transform(self.preprocessing, self.size, self.crop, self.mean, self.std, self.resample)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def embed_images(self, images: Images) -> torch.Tensor:
        """uint8 RGB ``[N, H, W, 3]`` (or N arrays) -> unit float32 embeddings ``[N, D]`` (one forward)."""
        pixels = self.pixels(images, self.device)
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels.to(self.model.dtype))
        return _normalise(_features(out))

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """N prompts -> unit float32 embeddings ``[N, D]``; one forward over the distinct prompts."""
        if self.tokenizer is None:
            raise ValueError("this CLIP encoder was loaded without a tokenizer")
        distinct = list(dict.fromkeys(prompts))
        max_length = min(self.model.config.text_config.max_position_embeddings, self.tokenizer.model_max_length)
        tokens = self.tokenizer(distinct, padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            emb = _normalise(_features(self.model.get_text_features(**tokens)))
        row = {p: i for i, p in enumerate(distinct)}
        return emb[torch.tensor([row[p] for p in prompts], device=emb.device, dtype=torch.long)]


def load_clip(model_path: str, processor_path: str | None = None, *, device: str = "cpu",
              dtype: str = "float32", text: bool = True, preprocessing: str = "transformers_pil") -> ClipEncoder:
    """CLIPModel from ``model_path``; tokenizer and preprocessor config from ``processor_path``
    (default ``model_path``); local folders or hub ids. ``preprocessing``: the reference's image
    preprocessing, one of ``images.CLIP_TRANSFORMS``."""
    if preprocessing not in CLIP_TRANSFORMS:
        raise ValueError(f"unknown CLIP preprocessing {preprocessing!r}; known: {', '.join(CLIP_TRANSFORMS)}")
    from transformers import CLIPModel, CLIPTokenizer

    try:  # transformers 5: the PIL backend; in 4.x the default CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - transformers 4
        from transformers import CLIPImageProcessor as ImageProcessor

    processor_path = processor_path or model_path
    model = CLIPModel.from_pretrained(model_path).to(device, torch_dtype(dtype)).eval().requires_grad_(False)
    proc = ImageProcessor.from_pretrained(processor_path)  # only its config is used (sizes, mean/std)
    size, crop = proc.size.get("shortest_edge"), proc.crop_size
    if not (proc.do_resize and proc.do_center_crop and proc.do_normalize and size and crop["height"] == crop["width"]):
        raise ValueError(f"{processor_path}: expected CLIP preprocessing (shortest-edge resize, square "
                         f"centre crop, normalise); got size={proc.size}, crop_size={proc.crop_size}")
    return ClipEncoder(model=model, tokenizer=CLIPTokenizer.from_pretrained(processor_path) if text else None,
                       size=int(size), crop=int(crop["height"]), mean=tuple(proc.image_mean),
                       std=tuple(proc.image_std), resample=Image.Resampling(int(proc.resample)),
                       preprocessing=preprocessing)


def locate_model_folder(checkpoints: Mapping[str, str | None], key: str, hub_id: str, allow_download: bool,
                   expect: Sequence[str]) -> str:
    """``weights.locate`` for a transformers folder, also checking that it holds model weights."""
    path = locate(checkpoints, key, expect=expect, hub_id=hub_id, allow_download=allow_download)
    if "config.json" in expect and Path(path).is_dir() and not any((Path(path) / f).exists() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"{PARAM_PREFIX}.{key}: {path} lacks model weights (one of {', '.join(WEIGHT_FILES)})")
    return path


class ClipScoreScorer(Scorer):
    """``cosine(text, image)`` of a CLIP model; ``scale`` (PickScore) multiplies it by ``logit_scale.exp()``."""

    name = "clipscore"

    def __init__(self, encoder: ClipEncoder, *, scale: bool = False) -> None:
        self.encoder = encoder
        self.scale = float(encoder.model.logit_scale.detach().float().exp()) if scale else 1.0

    def similarity(self, images: np.ndarray, prompts: Sequence[str]) -> torch.Tensor:
        """uint8 RGB ``[N, H, W, 3]`` and N prompts -> float32 ``[N]`` scale * cosine."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return self.scale * (self.encoder.embed_texts(prompts) * self.encoder.embed_images(images)).sum(-1)

    def score(self, images: np.ndarray, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any]]) -> list[ScoreRecord]:
        if len(images) == 0:
            return []
        return [ScoreRecord(float(s)) for s in self.similarity(images, prompts).cpu().tolist()]


class PickScoreScorer(ClipScoreScorer):
    """PickScore: ``logit_scale.exp() * cosine(text, image)``, the raw value (~22 in the tables).

    The released PickScore / Flow-GRPO reward code divides this by 26; we report it undivided.
    """

    name = "pickscore"

    def __init__(self, encoder: ClipEncoder) -> None:
        super().__init__(encoder, scale=True)


class AestheticMLP(nn.Module):
    """The published MLP (``self.layers``, no activations): ``[N, 768]`` -> ``[N, 1]``."""

    def __init__(self, input_dim: int = AESTHETIC_EMBED_DIM) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = (input_dim, *AESTHETIC_MLP_DIMS[1:])
        for d_in, d_out, p in zip(dims[:-1], dims[1:], AESTHETIC_MLP_DROPOUTS, strict=True):
            layers.append(nn.Linear(d_in, d_out))
            if p is not None:
                layers.append(nn.Dropout(p))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_aesthetic_mlp(path: str, key: str = "aesthetic_mlp") -> AestheticMLP:
    """The MLP from a state dict file (or ``AESTHETIC_MLP_URL``), checked against ``AESTHETIC_MLP_LAYOUT``."""
    if path.startswith("https://"):
        state = torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    layout = {k: tuple(v.shape) for k, v in state.items()}
    if layout != AESTHETIC_MLP_LAYOUT:
        raise ValueError(f"{PARAM_PREFIX}.{key}: {path} is not the LAION aesthetic MLP "
                         f"({AESTHETIC_MLP_FILE}); expected {AESTHETIC_MLP_LAYOUT}, got {layout}")
    mlp = AestheticMLP()
    mlp.load_state_dict(state)
    return mlp.eval().requires_grad_(False)


class AestheticScorer(Scorer):
    """LAION aesthetic score = MLP(L2-normalised CLIP ViT-L/14 image embedding); prompts are ignored.

    ``predict(list of uint8 [H_i, W_i, 3] arrays) -> float64 [N]`` scores images of any sizes in one
    forward: pass it as ``quality_fn`` to ``soar.data.prepare.prepare_dataset`` (which batches).
    The MLP runs in float32 on the encoder's device (the published script feeds it float32).
    """

    name = "aesthetic"

    def __init__(self, encoder: ClipEncoder, mlp: AestheticMLP) -> None:
        dim = encoder.model.config.projection_dim
        if dim != mlp.layers[0].in_features:
            raise ValueError(f"CLIP embedding dim {dim} != aesthetic MLP input {mlp.layers[0].in_features}")
        self.encoder, self.mlp = encoder, mlp.to(encoder.device, torch.float32).eval()

    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB ``[N, H, W, 3]`` or N arrays ``[H_i, W_i, 3]`` -> float64 scores ``[N]``."""
        if len(images) == 0:
            return np.zeros(0)
        with torch.inference_mode():
            return self.mlp(self.encoder.embed_images(images))[:, 0].double().cpu().numpy()

    def score(self, images: np.ndarray, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any]]) -> list[ScoreRecord]:
        return [ScoreRecord(float(s)) for s in self.predict(images)]


@register("clipscore")
def build_clipscore(*, checkpoints: Mapping[str, str | None], allow_download: bool = False,
                    device: str = "cpu", dtype: str = "float32") -> ClipScoreScorer:
    """ClipScore from ``score.checkpoints.clip_vit_l14`` (a folder of openai/clip-vit-large-patch14), images
    preprocessed as Flow-GRPO's clip_scorer.py."""
    path = locate_model_folder(checkpoints, "clip_vit_l14", CLIP_VIT_L14_HUB_ID, allow_download,
                          MODEL_FILES + PROCESSOR_FILES)
    return ClipScoreScorer(load_clip(path, device=device, dtype=dtype, preprocessing=CLIPSCORE_PREPROCESSING))


@register("pickscore")
def build_pickscore(*, checkpoints: Mapping[str, str | None], allow_download: bool = False,
                    device: str = "cpu", dtype: str = "float32") -> PickScoreScorer:
    """PickScore: model ``score.checkpoints.pickscore``, tokenizer/preprocessor ``...pickscore_processor``."""
    model = locate_model_folder(checkpoints, "pickscore", PICKSCORE_HUB_ID, allow_download, MODEL_FILES)
    proc = locate_model_folder(checkpoints, "pickscore_processor", PICKSCORE_PROCESSOR_HUB_ID, allow_download,
                          PROCESSOR_FILES)
    return PickScoreScorer(load_clip(model, proc, device=device, dtype=dtype))


@register("aesthetic")
def build_aesthetic(*, checkpoints: Mapping[str, str | None], allow_download: bool = False,
                    device: str = "cpu", dtype: str = "float32") -> AestheticScorer:
    """Aesthetic: CLIP ``score.checkpoints.clip_vit_l14`` + MLP file ``score.checkpoints.aesthetic_mlp``."""
    clip = locate_model_folder(checkpoints, "clip_vit_l14", CLIP_VIT_L14_HUB_ID, allow_download,
                          MODEL_FILES + ("preprocessor_config.json",))
    mlp = locate(checkpoints, "aesthetic_mlp", hub_id=AESTHETIC_MLP_URL, allow_download=allow_download,
                 what=AESTHETIC_MLP_FILE)
    return AestheticScorer(load_clip(clip, device=device, dtype=dtype, text=False), load_aesthetic_mlp(mlp))
