"""Image conversion shared by the learned scorers: uint8 RGB batches -> normalised model input.

Reference preprocessing of the CLIP family (``CLIPImageProcessor``, open_clip ``image_transform``,
BLIP's eval transform): resize the shorter side to ``size`` with bicubic resampling, centre-crop
``size`` x ``size``, scale to [0, 1], normalise per channel. The resize is done with PIL (what the
references use), the rest batched in torch.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from soar.rewards.base import as_uint8_batch

# OpenAI CLIP normalisation (openai/CLIP clip.py `_transform`; also open_clip OPENAI_DATASET_MEAN/STD,
# BLIP/ImageReward's transform and transformers' OPENAI_CLIP_MEAN/STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_center_crop(image: np.ndarray, size: int, resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """One uint8 image ``[H, W, 3]`` -> ``[size, size, 3]``: shorter side to ``size``, then centre crop."""
    h, w = image.shape[:2]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        image = image[top:top + size, left:left + size]
    return image


def clip_pixels(images: np.ndarray, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                resample=Image.Resampling.BICUBIC) -> torch.Tensor:
    """uint8 RGB ``[N, H, W, 3]`` -> float32 ``[N, 3, size, size]`` resized, cropped and normalised."""
    batch = as_uint8_batch(images)
    crops = np.stack([resize_center_crop(im, size, resample) for im in batch])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
