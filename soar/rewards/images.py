"""Image conversion shared by the learned scorers: uint8 RGB images -> normalised model input.

Reference preprocessing of the CLIP family: resize the shorter side to ``size`` with PIL bicubic
resampling (the longer side becomes ``int(size * long / short)``, truncated, as in transformers'
``get_resize_output_image_size`` and torchvision's ``Resize``), centre-crop ``crop`` x ``crop``,
scale to [0, 1], normalise per channel. This equals transformers' PIL-backend
``CLIPImageProcessorPil`` (the "slow" ``CLIPImageProcessor`` of transformers 4, with which the
published PickScore / CLIP numbers were computed) to float32 rounding. Transformers 5's default
``CLIPImageProcessor`` resizes with torchvision on tensors instead and differs by up to one grey
level (~0.015 after normalisation) on resized images; we follow the PIL reference.

Centre-crop offset: ``crop_offset="floor"`` is transformers' ``(H - crop) // 2``;
``crop_offset="round"`` is torchvision ``CenterCrop``'s ``int(round((H - crop) / 2))`` (OpenAI
``clip``, open_clip and BLIP transforms). They differ only when ``H - crop`` is odd.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from soar.rewards.base import as_uint8_batch

# OpenAI CLIP normalisation (openai/CLIP clip.py `_transform`; also open_clip OPENAI_DATASET_MEAN/STD,
# BLIP/ImageReward's transform and transformers' OPENAI_CLIP_MEAN/STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_OFFSETS = ("floor", "round")


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the shorter side ``size`` and the longer ``int(size * long / short)``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _offset(extent: int, crop: int, rule: str) -> int:
    return (extent - crop) // 2 if rule == "floor" else int(round((extent - crop) / 2.0))


def resize_center_crop(image: np.ndarray, size: int, resample=Image.Resampling.BICUBIC, *,
                       crop: int | None = None, crop_offset: str = "floor") -> np.ndarray:
    """One uint8 image ``[H, W, 3]`` -> ``[crop, crop, 3]``: shorter side to ``size``, then centre crop.

    ``crop`` defaults to ``size`` and may not exceed it (the references would pad).
    """
    crop = size if crop is None else crop
    if crop > size:
        raise ValueError(f"crop {crop} larger than the resized shorter side {size}")
    if crop_offset not in CROP_OFFSETS:
        raise ValueError(f"crop_offset must be one of {CROP_OFFSETS}, got {crop_offset!r}")
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, size)
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    top, left = _offset(new_h, crop, crop_offset), _offset(new_w, crop, crop_offset)
    return image[top:top + crop, left:left + crop]


def _uint8_images(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Check uint8 RGB images (one ``[N, H, W, 3]`` array, or ``[H, W, 3]`` arrays of any sizes)."""
    if isinstance(images, np.ndarray):
        return list(as_uint8_batch(images))
    return [as_uint8_batch(np.asarray(im)[None])[0] for im in images]


def clip_pixels(images: np.ndarray | Sequence[np.ndarray], size: int, mean=OPENAI_CLIP_MEAN,
                std=OPENAI_CLIP_STD, resample=Image.Resampling.BICUBIC, *, crop: int | None = None,
                crop_offset: str = "floor") -> torch.Tensor:
    """uint8 RGB ``[N, H, W, 3]`` (or N arrays ``[H_i, W_i, 3]``) -> float32 ``[N, 3, crop, crop]``.

    Resized (shorter side ``size``), centre-cropped (``crop``, default ``size``), scaled to [0, 1]
    and normalised with ``mean`` / ``std``.
    """
    crops = [resize_center_crop(im, size, resample, crop=crop, crop_offset=crop_offset)
             for im in _uint8_images(images)]
    if not crops:
        side = size if crop is None else crop
        return torch.empty(0, 3, side, side)
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
