"""Image conversion shared by the learned scorers: uint8 RGB images -> normalised model input.

Every CLIP-family reference resizes the shorter side to ``size`` (the longer side becomes
``int(size * long / short)``, truncated, as in transformers' ``get_resize_output_image_size`` and
torchvision's ``Resize``; no resize when the shorter side is already ``size``), centre-crops
``crop`` x ``crop``, scales to [0, 1] and normalises per channel. They differ in how, and each
model uses the one of its reference, chosen once when it is loaded (``clip_transform``):

* ``"transformers_pil"`` — transformers' PIL-backend ``CLIPImageProcessorPil`` (the "slow"
  ``CLIPImageProcessor`` of transformers 4, with which the published PickScore / Aesthetic numbers
  were computed): PIL resize of the uint8 image (bicubic), crop offset ``(H - crop) // 2``, then
  scale and normalise. Equal to it to float32 rounding. (Transformers 5's default
  ``CLIPImageProcessor`` resizes with torchvision on tensors instead and differs by up to one grey
  level on resized images; we follow the PIL reference.)
* ``"torchvision_pil"`` — torchvision ``Resize`` (bicubic) / ``CenterCrop`` / ``ToTensor`` /
  ``Normalize`` on PIL images: open_clip's and OpenAI ``clip``'s evaluation transform (GenEval's
  evaluate_images.py colour classifier, open_clip ``ViT-L-14`` ``openai``) and BLIP's. The same PIL
  resize; crop offset ``int(round((H - crop) / 2))`` (Python's round: half to even).
* ``"torchvision_float"`` — Flow-GRPO's clip_scorer.py (ClipScore): torchvision ``Resize(size)``,
  ``CenterCrop(crop)``, ``Normalize(mean, std)`` applied to the float [0, 1] batch ``[N, 3, H, W]``:
  the uint8 images are scaled first, then resized bilinearly with antialiasing (torchvision's default
  for tensors) and cropped with the rounded offset. Written with torch ops (the
  ``torch.nn.functional.interpolate`` call torchvision's tensor backend makes), so torchvision is not
  needed; equal to torchvision's transform to float32 rounding.

``crop_offset`` of the PIL functions: ``"floor"`` is transformers' ``(H - crop) // 2``, ``"round"``
torchvision ``CenterCrop``'s; they differ only when ``H - crop`` is odd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from soar.rewards.base import as_uint8_batch

# OpenAI CLIP normalisation (openai/CLIP clip.py `_transform`; also open_clip OPENAI_DATASET_MEAN/STD,
# BLIP/ImageReward's transform and transformers' OPENAI_CLIP_MEAN/STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_OFFSETS = ("floor", "round")
CLIP_TRANSFORMS = ("transformers_pil", "torchvision_pil", "torchvision_float")  # see the module docstring

Images = np.ndarray | Sequence[np.ndarray]  # uint8 RGB [N, H, W, 3], or N arrays [H_i, W_i, 3]
ClipTransform = Callable[[Images, torch.device | str], torch.Tensor]  # (images, device) -> float32 pixels there


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the shorter side ``size`` and the longer ``int(size * long / short)``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _offset(extent: int, crop: int, rule: str) -> int:
    return (extent - crop) // 2 if rule == "floor" else int(round((extent - crop) / 2.0))


def _check_crop(size: int, crop: int | None) -> int:
    crop = size if crop is None else crop
    if crop > size:
        raise ValueError(f"crop {crop} larger than the resized shorter side {size} (the references would pad)")
    return crop


def resize_center_crop(image: np.ndarray, size: int, resample=Image.Resampling.BICUBIC, *,
                       crop: int | None = None, crop_offset: str = "floor") -> np.ndarray:
    """One uint8 image ``[H, W, 3]`` -> ``[crop, crop, 3]``: shorter side to ``size`` (PIL), then centre crop.

    ``crop`` defaults to ``size`` and may not exceed it (the references would pad).
    """
    crop = _check_crop(size, crop)
    if crop_offset not in CROP_OFFSETS:
        raise ValueError(f"crop_offset must be one of {CROP_OFFSETS}, got {crop_offset!r}")
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, size)
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    top, left = _offset(new_h, crop, crop_offset), _offset(new_w, crop, crop_offset)
    return image[top:top + crop, left:left + crop]


def _uint8_images(images: Images) -> list[np.ndarray]:
    """Check uint8 RGB images (one ``[N, H, W, 3]`` array, or ``[H, W, 3]`` arrays of any sizes)."""
    if isinstance(images, np.ndarray):
        return list(as_uint8_batch(images))
    return [as_uint8_batch(np.asarray(im)[None])[0] for im in images]


def normalise(x: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``[N, 3, H, W]`` (torchvision ``Normalize``'s two operations)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def clip_pixels(images: Images, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                resample=Image.Resampling.BICUBIC, *, crop: int | None = None,
                crop_offset: str = "floor") -> torch.Tensor:
    """The PIL references: uint8 RGB ``[N, H, W, 3]`` (or N arrays ``[H_i, W_i, 3]``) -> float32
    ``[N, 3, crop, crop]`` on the CPU.

    Each image resized with PIL (shorter side ``size``), centre-cropped (``crop``, default ``size``;
    offset rule ``crop_offset``), then scaled to [0, 1] and normalised with ``mean`` / ``std``.
    """
    crops = [resize_center_crop(im, size, resample, crop=crop, crop_offset=crop_offset)
             for im in _uint8_images(images)]
    if not crops:
        side = _check_crop(size, crop)
        return torch.empty(0, 3, side, side)
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)
    return normalise(x, mean, std)


def _same_size_groups(images: Images) -> list[tuple[list[int], np.ndarray]]:
    """``(indices, uint8 [n, H, W, 3])`` per distinct image size, in order of first appearance."""
    if isinstance(images, np.ndarray):
        batch = as_uint8_batch(images)
        return [(list(range(len(batch))), batch)] if len(batch) else []
    groups: dict[tuple[int, int], list[int]] = {}
    checked = _uint8_images(images)
    for i, im in enumerate(checked):
        groups.setdefault(im.shape[:2], []).append(i)
    return [(idx, np.stack([checked[i] for i in idx])) for idx in groups.values()]


def resize_center_crop_float(x: torch.Tensor, size: int, crop: int) -> torch.Tensor:
    """float ``[N, 3, H, W]`` -> ``[N, 3, crop, crop]`` as torchvision's ``Resize(size)`` (bilinear,
    antialias, half-pixel centres) then ``CenterCrop(crop)`` (rounded offset) do on tensors."""
    h, w = x.shape[-2:]
    new_h, new_w = resized_shape(h, w, size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = _offset(new_h, crop, "round"), _offset(new_w, crop, "round")
    return x[..., top:top + crop, left:left + crop]


def clip_pixels_float(images: Images, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, *,
                      crop: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flow-GRPO's ClipScore preprocessing: uint8 RGB ``[N, H, W, 3]`` (or N arrays) -> float32
    ``[N, 3, crop, crop]`` on ``device``.

    The images are moved to ``device`` as uint8, scaled to float [0, 1] ``[n, 3, H, W]``, then resized
    (``resize_center_crop_float``), cropped and normalised, one call per distinct image size.
    """
    crop = _check_crop(size, crop)
    parts, order = [], []
    for idx, batch in _same_size_groups(images):
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).contiguous().float().div(255.0)
        parts.append(resize_center_crop_float(x, size, crop))
        order.extend(idx)
    if not parts:
        return torch.empty(0, 3, crop, crop, device=device)
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    if order != sorted(order):  # rows are grouped by size: back to the input order
        x = x[torch.argsort(torch.tensor(order, device=x.device))]
    return normalise(x, mean, std)


def clip_transform(kind: str, size: int, crop: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                   resample=Image.Resampling.BICUBIC) -> ClipTransform:
    """The preprocessing of reference ``kind`` (one of ``CLIP_TRANSFORMS``, see the module docstring) as a
    function ``(images, device) -> float32 [N, 3, crop, crop]`` on ``device``; ``resample``: PIL kinds only."""
    if kind == "torchvision_float":
        def transform(images: Images, device: torch.device | str) -> torch.Tensor:
            return clip_pixels_float(images, size, mean, std, crop=crop, device=device)
    elif kind in ("transformers_pil", "torchvision_pil"):
        offset = "floor" if kind == "transformers_pil" else "round"

        def transform(images: Images, device: torch.device | str) -> torch.Tensor:
            return clip_pixels(images, size, mean, std, resample, crop=crop, crop_offset=offset).to(device)
    else:
        raise ValueError(f"unknown CLIP preprocessing {kind!r}; known: {', '.join(CLIP_TRANSFORMS)}")
    _check_crop(size, crop)
    return transform
