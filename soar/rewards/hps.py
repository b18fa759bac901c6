"""HPSv2.1 (Human Preference Score v2.1): cosine(text, image) of the HPSv2-tuned open_clip ViT-H-14.

Reference: tgxs002/HPSv2 ``hpsv2/img_score.py``: ``create_model_and_transforms('ViT-H-14', ...)`` of
its vendored open_clip, ``model.load_state_dict(torch.load(cp)['state_dict'])`` (strict),
``get_tokenizer('ViT-H-14')``; score = diagonal of ``image_features @ text_features.T`` with both
features L2-normalised (``output_dict=True``); about 0.28 on the paper's prompt sets
(docs/method.md#preference-and-quality-scores).

- Weights: ``score.checkpoints.hpsv21`` = ``HPS_v2.1_compressed.pt`` (hub ``xswu/HPSv2``), a torch file
  whose ``state_dict`` is the whole open_clip CLIP state dict, loaded with ``strict=True``.
- Architecture: open_clip's ``HPS_ARCH`` config built with ``pretrained=None`` (no download; HPSv2
  first loads the laion2B-s32B-b79K weights, then overwrites every one of them).
- Preprocessing: HPSv2's ``preprocess_val`` is open_clip's eval transform with
  ``resize_longest_max=True``: bicubic resize of the *longer* side to 224, centred black padding to
  224 x 224, ToTensor, OpenAI CLIP mean/std. open_clip 3 spells it ``image_resize_mode="longest"``.
  On square images (the paper's 512 x 512) it equals resize-shorter-side + centre crop.
- Text: open_clip's SimpleTokenizer (its BPE vocabulary ships in the wheel), 77 tokens, truncated.
- dtype: the reference runs under CUDA fp16 autocast ('amp'); here the model is cast to ``dtype`` and
  the features are normalised in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from soar.rewards.base import Scorer, ScoreRecord, as_uint8_batch, register
from soar.rewards.weights import PARAM_PREFIX, fetch_file, import_extra, locate, torch_dtype

HPS_ARCH = "ViT-H-14"  # open_clip model config (hpsv2/img_score.py)
HPS_HUB_ID = "xswu/HPSv2"  # hpsv2/utils.py hps_version_map: v2.1 -> HPS_v2.1_compressed.pt
HPS_FILE = "HPS_v2.1_compressed.pt"
HPS_RESIZE_MODE = "longest"  # HPSv2 factory: image_transform(..., is_train=False, resize_longest_max=True)
CHECKPOINT_KEY = "hpsv21"


class _NotRandomInit(logging.Filter):
    """Drops open_clip's 'initialized randomly' warning: the weights are loaded right after creation."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def load_hps(path: str, *, arch: str = HPS_ARCH, device: str = "cpu", dtype: str = "float32",
             key: str = CHECKPOINT_KEY) -> tuple[Any, Callable[[Image.Image], torch.Tensor], Any]:
    """``(model, preprocess, tokenizer)``: open_clip ``arch`` with the ``state_dict`` of the file ``path``.

    ``preprocess``: PIL RGB image -> float32 ``[3, S, S]``; ``tokenizer``: N strings -> int64 ``[N, 77]``.
    """
    open_clip = import_extra("open_clip", "hpsv2")
    quiet = _NotRandomInit()
    logging.getLogger().addFilter(quiet)  # open_clip logs through the root logger
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=None, image_resize_mode=HPS_RESIZE_MODE, output_dict=True)
    finally:
        logging.getLogger().removeFilter(quiet)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"{PARAM_PREFIX}.{key}: {path} is not an HPSv2 checkpoint (no 'state_dict' entry)")
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    model = model.to(device=device, dtype=torch_dtype(dtype)).eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(arch)


class HPSv21Scorer(Scorer):
    """HPSv2.1 = cosine(open_clip text embedding, image embedding), one image and one text forward per call."""

    name = "hpsv21"

    def __init__(self, model: Any, preprocess: Callable[[Image.Image], torch.Tensor], tokenizer: Any) -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device = model.logit_scale.device
        self.dtype = model.logit_scale.dtype

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """uint8 RGB ``[N, H, W, 3]`` -> float32 ``[N, 3, S, S]`` through the reference transform."""
        return torch.stack([self.preprocess(Image.fromarray(im)) for im in as_uint8_batch(images)])

    def similarity(self, images: np.ndarray, prompts: Sequence[str]) -> torch.Tensor:
        """uint8 RGB ``[N, H, W, 3]`` and N prompts -> float32 cosines ``[N]`` (distinct prompts encoded once)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        distinct = list(dict.fromkeys(prompts))
        with torch.inference_mode():
            img = self.model.encode_image(self.pixels(images).to(self.device, self.dtype)).float()
            txt = self.model.encode_text(self.tokenizer(distinct).to(self.device)).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        row = {p: i for i, p in enumerate(distinct)}
        rows = torch.tensor([row[p] for p in prompts], device=txt.device)
        return (img * txt[rows]).sum(-1)

    def score(self, images: np.ndarray, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any]]) -> list[ScoreRecord]:
        if len(images) == 0:
            return []
        return [ScoreRecord(float(s)) for s in self.similarity(images, prompts).cpu().tolist()]


@register("hpsv21")
def build_hpsv21(*, checkpoints: Mapping[str, str | None], allow_download: bool = False, device: str = "cpu",
                 dtype: str = "float32", arch: str = HPS_ARCH) -> HPSv21Scorer:
    """HPSv2.1 from ``score.checkpoints.hpsv21`` (``HPS_v2.1_compressed.pt``); ``arch``: open_clip config name."""
    located = locate(checkpoints, CHECKPOINT_KEY, hub_id=HPS_HUB_ID, allow_download=allow_download, what=HPS_FILE)
    model, preprocess, tokenizer = load_hps(fetch_file(located, HPS_HUB_ID, HPS_FILE), arch=arch,
                                            device=device, dtype=dtype)
    return HPSv21Scorer(model, preprocess, tokenizer)
