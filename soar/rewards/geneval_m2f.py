"""GenEval's published evaluator on transformers: Mask2Former Swin-S COCO + CLIP ViT-L/14 colours.

Reference: djghosh13/geneval ``evaluation/evaluate_images.py`` (mmdet 2.x config
``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``, open_clip ``ViT-L-14`` ``openai``). The detector's
weights: the protocol's mmdetection checkpoint (``MMDET_CHECKPOINT``, converted on load by
``mmdet_mask2former``) or a transformers folder (``MASK2FORMER_HUB_ID`` is a Detectron2 training of
the same architecture: other weights, other scores). Per batch of uint8 RGB images ``[N, H, W, 3]``
(all of one size):

1. Detector input as mmdet's test pipeline (``detector_input``): keep-ratio resize to the scale
   ``(1333, 800)`` with mmcv's rounding and its cv2 bilinear resize of the uint8 image, mmcv's
   ``imnormalize`` (cv2 subtract / multiply by the float64 ``1 / std``), zero-pad to a multiple of 32;
   one forward, eval, no grad.
2. Instances as mmdet's ``MaskFormerFusionHead.instance_postprocess``: the top 100 (query, class)
   pairs by class probability; mask logits upsampled (bilinear) to the padded input, cropped to the
   resized image, resized to ``H x W``; mask = logit > 0; score = class prob * mean sigmoid on the
   mask; box = the mask's extent (``mask2bbox``: ``x1 = last column + 1``).
3. Class ids -> GenEval class names (``object_names.txt``); only ``score > 0.3`` is kept here (the
   lowest threshold of any tag: a score is at most its class probability, so pairs below it are
   dropped before upsampling). The rules engine applies the tag's threshold, order and cap.
4. Colour, only for the objects a colour clause inspects (the top ``count`` of its class, when there
   are that many), as evaluate_images.py's ``ImageCrops`` and ``color_classification``: the image
   composited over ``#999`` outside the mask, cropped to the box (rounded as PIL's ``Image.crop``),
   then open_clip's ``ViT-L-14`` ``openai`` evaluation transform: torchvision ``Resize(224)`` bicubic
   on the PIL image (long side ``int(224 * long / short)``), ``CenterCrop(224)`` at offset
   ``int(round((H - 224) / 2))``, ``ToTensor``, ``Normalize`` (OpenAI mean/std)
   (``images.clip_transform("torchvision_pil", ...)``, sizes and mean/std from the CLIP folder's
   preprocessor config). One CLIP forward for the whole batch; zero-shot over ``GENEVAL_COLORS`` with
   the three templates as clip_benchmark's ``zero_shot_classifier`` (per colour the mean of the
   L2-normalised text embeddings, renormalised) and ``run_classification`` (``100 * unit image
   embedding @ weights``); argmax, first on ties.
5. Precision: the official evaluator runs both CLIP forwards in float32 weights under
   ``torch.cuda.amp.autocast()`` (clip_benchmark's default ``amp=True``: float16 on CUDA), the logits
   matmul included. ``ColorClassifier(autocast=...)`` does the same on CUDA (``score.geneval_color_autocast``);
   on other devices it never autocasts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2  # mmcv's resize backend (opencv comes with rapidocr)
import numpy as np
import torch
import torch.nn.functional as F

from soar.rewards import weights
from soar.rewards.clip_scores import CLIP_VIT_L14_HUB_ID, MODEL_FILES, ClipEncoder, load_clip, locate_model_folder
from soar.rewards.geneval import GenEvalBase
from soar.rewards.geneval_rules import GENEVAL_COLORS, THRESHOLD, Detection, keep_detections
from soar.rewards.mmdet_mask2former import MMDET_COCO_CLASSES, load_mmdet_mask2former

MASK2FORMER_HUB_ID = "facebook/mask2former-swin-small-coco-instance"  # transformers port of the Swin-S COCO model
# GenEval's detector (its download_models.sh): mmdetection's model zoo, Mask2Former Swin-S COCO instances.
MMDET_CHECKPOINT = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth"
MMDET_MEAN = (123.675, 116.28, 103.53)  # mmdet img_norm_cfg mean, RGB (to_rgb=True)
MMDET_STD = (58.395, 57.12, 57.375)  # mmdet img_norm_cfg std, RGB
TEST_SCALE = (1333, 800)  # mmdet test_pipeline: Resize(img_scale=(1333, 800), keep_ratio=True)
SIZE_DIVISOR = 32  # mmdet test_pipeline: Pad(size_divisor=32), zeros after Normalize
MAX_PER_IMAGE = 100  # mmdet Mask2Former test_cfg.max_per_image
CROP_BACKGROUND = (153, 153, 153)  # evaluate_images.py ImageCrops: bgcolor "#999"
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
COLOR_PREPROCESSING = "torchvision_pil"  # open_clip's ViT-L-14 evaluation transform (images.CLIP_TRANSFORMS)
COLOR_AUTOCAST_DTYPES = ("float16", "bfloat16")  # allowed autocast dtypes of the colour forwards
DEFAULT_COLOR_AUTOCAST = "float16"  # clip_benchmark's amp=True: torch.cuda.amp.autocast() (float16)
AUTOCAST_DEVICE_TYPES = ("cuda",)  # devices the colour forwards autocast on (the official one runs on CUDA)
# evaluation/object_names.txt: mmdet's COCO classes in mmdet's order, with GenEval's three renames.
GENEVAL_RENAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
GENEVAL_CLASSES = tuple(GENEVAL_RENAMES.get(c, c) for c in MMDET_COCO_CLASSES)
# Other spellings of the same classes (Detectron2/HF id2label, PASCAL-style names) -> GenEval's.
LABEL_ALIASES = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "motorbike": "motorcycle",
    "aeroplane": "airplane", "sofa": "couch", "pottedplant": "potted plant", "diningtable": "dining table",
    "tvmonitor": "tv", "tv monitor": "tv", "hair dryer": "hair drier", "doughnut": "donut",
}


def geneval_class_names(id2label: Mapping[Any, str]) -> tuple[str, ...]:
    """GenEval class name per detector class id ``0..79``; an error unless the 80 COCO classes map 1:1."""
    ids = sorted(int(k) for k in id2label)
    labels = {int(k): str(v) for k, v in id2label.items()}
    names = [" ".join(labels[i].lower().replace("_", " ").replace("-", " ").split()) for i in ids]
    names = [LABEL_ALIASES.get(n, n) for n in names]
    unknown = [labels[i] for i, n in zip(ids, names, strict=True) if n not in GENEVAL_CLASSES]
    if ids != list(range(len(GENEVAL_CLASSES))) or unknown or len(set(names)) != len(names):
        raise ValueError(f"geneval: the detector's id2label is not the 80 COCO classes (ids {ids[:3]}..., "
                         f"unmapped labels {unknown[:5]}); expected {MASK2FORMER_HUB_ID} or a copy")
    return tuple(names)


def scaled_size(height: int, width: int, scale: tuple[int, int] = TEST_SCALE) -> tuple[int, int]:
    """mmcv ``rescale_size``: the largest keep-ratio size within ``scale`` (long, short), rounded half up."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def detector_input(images: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 RGB ``[N, H, W, 3]`` -> float32 ``[N, 3, ph, pw]`` as mmdet's test pipeline, and the resized
    size ``(sh, sw)`` inside the zero padding (``ph``, ``pw``: multiples of ``SIZE_DIVISOR``).

    Per image as mmcv: ``imrescale`` (``cv2.resize`` bilinear of the uint8 image to ``scaled_size``),
    ``imnormalize`` (float32; cv2 subtract ``MMDET_MEAN`` and multiply by ``1 / MMDET_STD`` in float64
    scalars); mmdet's BGR load and ``to_rgb`` cancel out on RGB input. Then ``Pad`` with zeros.
    """
    h, w = images.shape[1:3]
    sh, sw = scaled_size(h, w)
    ph, pw = -(-sh // SIZE_DIVISOR) * SIZE_DIVISOR, -(-sw // SIZE_DIVISOR) * SIZE_DIVISOR
    mean, stdinv = np.float64(MMDET_MEAN).reshape(1, -1), 1 / np.float64(MMDET_STD).reshape(1, -1)
    out = np.zeros((len(images), ph, pw, 3), np.float32)
    for i, image in enumerate(images):
        x = cv2.resize(np.ascontiguousarray(image), (sw, sh), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        cv2.subtract(x, mean, x)
        cv2.multiply(x, stdinv, x)
        out[i, :sh, :sw] = x
    return torch.from_numpy(out).permute(0, 3, 1, 2), (sh, sw)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet ``mask2bbox``: bool ``[K, H, W]`` -> float32 ``[K, 4]`` ``(x0, y0, x1 + 1, y1 + 1)``; empty -> 0."""
    out = []
    for extent in (masks.any(dim=1), masks.any(dim=2)):  # [K, W] columns, [K, H] rows
        idx = torch.arange(extent.shape[1], device=masks.device)
        first = torch.where(extent, idx, extent.shape[1]).amin(dim=1)
        last = torch.where(extent, idx, -1).amax(dim=1) + 1
        out.append((first, last))
    (x0, x1), (y0, y1) = out
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where(masks.flatten(1).any(dim=1)[:, None], boxes, torch.zeros_like(boxes))


def postprocess_instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded_hw: tuple[int, int],
                          input_hw: tuple[int, int], image_hw: tuple[int, int], *, min_score: float = THRESHOLD,
                          max_per_image: int = MAX_PER_IMAGE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's instances, as mmdet: ``class_logits [Q, C + 1]`` (last = no object), ``mask_logits
    [Q, h, w]`` over the padded input ``padded_hw``, of which ``input_hw`` is the resized image.

    Returns class ids ``[K]`` (long), scores ``[K]`` (float32) and masks ``[K, *image_hw]`` (bool) of
    the instances scoring above ``min_score``, in top-k order.
    """
    num_classes = class_logits.shape[-1] - 1
    probs = class_logits.float().softmax(dim=-1)[:, :-1].flatten()
    top, index = probs.topk(min(max_per_image, probs.numel()), sorted=False)
    keep = top > min_score  # score = prob * mask score <= prob: the rest can never pass
    top, labels, query = top[keep], index[keep] % num_classes, index[keep] // num_classes
    if not len(query):
        return labels, top, torch.zeros((0, *image_hw), dtype=torch.bool, device=mask_logits.device)
    logits = F.interpolate(mask_logits[query][None].float(), size=padded_hw, mode="bilinear", align_corners=False)
    logits = logits[..., :input_hw[0], :input_hw[1]]
    logits = F.interpolate(logits, size=image_hw, mode="bilinear", align_corners=False)[0]
    masks = logits > 0
    mask_score = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    scores = top * mask_score
    keep = scores > min_score
    return labels[keep], scores[keep], masks[keep]


def to_detections(labels: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor, names: Sequence[str],
                  *, min_score: float = THRESHOLD) -> tuple[list[Detection], list[np.ndarray]]:
    """Instances (ids ``[K]``, scores ``[K]``, bool masks ``[K, H, W]``) -> rules-engine detections scoring
    above ``min_score`` (boxes from the masks), most confident first, and their masks as numpy bool."""
    boxes = mask_boxes(masks).cpu().numpy().astype(np.float64)
    order = torch.argsort(-scores.float().cpu(), stable=True).tolist()
    ids, conf, masks_np = labels.cpu().tolist(), scores.float().cpu().tolist(), masks.cpu().numpy()
    passing = (scores.float() > min_score).cpu().tolist()  # in float32, as the official numpy comparison
    dets, kept = [], []
    for k in order:
        if passing[k]:
            dets.append(Detection(names[ids[k]], float(conf[k]), tuple(float(v) for v in boxes[k])))
            kept.append(masks_np[k])
    return dets, kept


def crop_on_background(image: np.ndarray, mask: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """``image [H, W, 3]`` uint8 with ``CROP_BACKGROUND`` outside bool ``mask [H, W]``, cropped to ``box``
    ``(x0, y0, x1, y1)`` rounded as PIL's ``Image.crop`` (at least one pixel) -> ``[h, w, 3]`` uint8."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    out = np.where(mask[..., None], image, np.asarray(CROP_BACKGROUND, dtype=np.uint8))
    return np.ascontiguousarray(out[y0:y1, x0:x1])


def resolve_autocast(device: torch.device | str, dtype: str | None) -> tuple[str, torch.dtype] | None:
    """``(device type, dtype)`` the colour forwards autocast to: ``dtype`` (one of ``COLOR_AUTOCAST_DTYPES``)
    on a device of ``AUTOCAST_DEVICE_TYPES``; None (no autocast) elsewhere or when ``dtype`` is None."""
    if dtype is not None and dtype not in COLOR_AUTOCAST_DTYPES:
        raise ValueError(f"geneval: colour autocast dtype must be null or one of {COLOR_AUTOCAST_DTYPES}, "
                         f"got {dtype!r}")
    device_type = torch.device(device).type
    if dtype is None or device_type not in AUTOCAST_DEVICE_TYPES:
        return None
    return device_type, weights.torch_dtype(dtype)


def autocast_context(autocast: tuple[str, torch.dtype] | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a ``resolve_autocast`` result; a null context for None."""
    if autocast is None:
        return contextlib.nullcontext()
    device_type, dtype = autocast
    return torch.autocast(device_type=device_type, dtype=dtype)


class ColorClassifier:
    """CLIP zero-shot colour of object crops: ``GENEVAL_COLORS`` x ``COLOR_TEMPLATES`` per class name,
    on a ``clip_scores.ClipEncoder`` (the ClipScore/Aesthetic loading path) whose images are preprocessed
    as open_clip's transform (``COLOR_PREPROCESSING``, whatever ``encoder`` was loaded with).

    ``autocast``: dtype both CLIP forwards (and the logits) autocast to on CUDA, as the official
    evaluator (float16); None: the model's dtype throughout. Resolved once here: on the CPU, never.
    """

    def __init__(self, encoder: ClipEncoder, autocast: str | None = DEFAULT_COLOR_AUTOCAST) -> None:
        self.encoder = replace(encoder, preprocessing=COLOR_PREPROCESSING)
        self.autocast = resolve_autocast(self.encoder.device, autocast)
        self._text: dict[str, torch.Tensor] = {}

    @property
    def model(self) -> Any:
        return self.encoder.model

    @property
    def tokenizer(self) -> Any:
        return self.encoder.tokenizer

    def text_weights(self, cls: str) -> torch.Tensor:
        """float32 ``[len(GENEVAL_COLORS), D]``: per colour, the renormalised mean of the templates' unit
        text embeddings (cached per class)."""
        if cls not in self._text:
            texts = [t.format(c=c, cls=cls) for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
            with autocast_context(self.autocast):
                emb = self.encoder.embed_texts(texts)
            emb = emb.view(len(GENEVAL_COLORS), len(COLOR_TEMPLATES), -1)
            self._text[cls] = F.normalize(emb.mean(1), dim=-1)
        return self._text[cls]

    def image_features(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """Unit CLIP image embeddings float32 ``[N, D]`` of uint8 crops of any sizes (one forward)."""
        return self.encoder.embed_images(list(crops))

    def logits(self, crops: Sequence[np.ndarray], classes: Sequence[str]) -> torch.Tensor:
        """float32 ``[N, len(GENEVAL_COLORS)]``: ``100 * cos(crop, colour)`` against each crop's class (under
        autocast the matmul, and so the logits, are in the autocast dtype, as the official ones)."""
        text = torch.stack([self.text_weights(c) for c in classes])  # [N, colours, D]
        with autocast_context(self.autocast):
            logits = (100.0 * self.image_features(crops))[:, None, :] @ text.transpose(1, 2)  # [N, 1, colours]
        return logits[:, 0].float()

    def __call__(self, crops: Sequence[np.ndarray], classes: Sequence[str]) -> list[str]:
        """The colour (argmax) of each crop; ``classes`` names each crop's object class."""
        if not crops:
            return []
        return [GENEVAL_COLORS[int(i)] for i in self.logits(crops, classes).argmax(dim=1)]


class Mask2FormerGenEval(GenEvalBase):
    """The published GenEval evaluator: ``detector`` (Mask2FormerForUniversalSegmentation), colours
    from ``colors``; see the module docstring."""

    def __init__(self, detector: Any, colors: ColorClassifier, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.detector, self.colors = detector.eval(), colors
        self.device, self.dtype = torch.device(device), dtype
        self.class_names = geneval_class_names(detector.config.id2label)

    @torch.no_grad()
    def instances(self, images: np.ndarray) -> list[tuple[list[Detection], list[np.ndarray]]]:
        """Per image of uint8 ``[N, H, W, 3]``: detections above 0.3 (no colours) and their masks."""
        pixels, resized = detector_input(images)
        out = self.detector(pixel_values=pixels.to(self.device, self.dtype))
        padded, image_hw = tuple(pixels.shape[-2:]), tuple(images.shape[1:3])
        return [to_detections(*postprocess_instances(cls, masks, padded, resized, image_hw), self.class_names)
                for cls, masks in zip(out.class_queries_logits, out.masks_queries_logits, strict=True)]

    def detect(self, images: np.ndarray, metadata: Sequence[Mapping[str, Any]]) -> list[list[Detection]]:
        """Detections per image; those a colour clause will inspect get their CLIP colour (one forward)."""
        found = self.instances(images)
        wanted: dict[tuple[int, int], None] = {}  # (image, detection index), in order
        for i, (meta, (dets, _)) in enumerate(zip(metadata, found, strict=True)):
            index = {id(d): k for k, d in enumerate(dets)}
            objects = keep_detections(dets, str(meta["tag"]))
            for req in meta["include"]:
                top = objects.get(req["class"], [])[:int(req["count"])]
                if "color" in req and len(top) == int(req["count"]):
                    wanted.update(dict.fromkeys((i, index[id(d)]) for d in top))
        crops = [crop_on_background(images[i], found[i][1][k], found[i][0][k].box) for i, k in wanted]
        colors = dict(zip(wanted, self.colors(crops, [found[i][0][k].label for i, k in wanted]), strict=True))
        return [[replace(d, color=colors[(i, k)]) if (i, k) in colors else d for k, d in enumerate(dets)]
                for i, (dets, _) in enumerate(found)]


def load_mask2former_geneval(checkpoints: Mapping[str, str | None], *, allow_download: bool = False,
                             device: str = "cpu", dtype: str = "float32",
                             color_autocast: str | None = DEFAULT_COLOR_AUTOCAST) -> Mask2FormerGenEval:
    """Load both models from ``score.checkpoints.{mask2former, clip_vit_l14}`` (hub ids only when
    ``allow_download``) onto ``device`` in ``dtype`` (``float32``, ``float16`` or ``bfloat16``);
    ``color_autocast``: ``ColorClassifier``'s ``autocast``."""
    torch_dtype = weights.torch_dtype(dtype)
    detector = load_detector(checkpoints, allow_download=allow_download)
    clip_path = locate_model_folder(checkpoints, "clip_vit_l14", CLIP_VIT_L14_HUB_ID, allow_download,
                                    MODEL_FILES + ("preprocessor_config.json", "tokenizer_config.json"))
    colors = ColorClassifier(load_clip(clip_path, device=device, dtype=dtype), autocast=color_autocast)
    return Mask2FormerGenEval(detector.to(device=device, dtype=torch_dtype), colors, device, torch_dtype)


def load_detector(checkpoints: Mapping[str, str | None], *, allow_download: bool = False) -> Any:
    """The Mask2Former of ``score.checkpoints.mask2former``: a file is an mmdetection checkpoint (GenEval's
    ``MMDET_CHECKPOINT``, converted), a folder a transformers one (hub id only when ``allow_download``)."""
    path = checkpoints.get("mask2former")
    if path is not None and Path(path).is_file():
        return load_mmdet_mask2former(path)
    det_path = weights.locate(checkpoints, "mask2former", expect=("config.json",), hub_id=MASK2FORMER_HUB_ID,
                              allow_download=allow_download,
                              what=f"GenEval's {MMDET_CHECKPOINT}, or a transformers Mask2Former Swin-S COCO folder")
    from transformers import Mask2FormerForUniversalSegmentation

    return Mask2FormerForUniversalSegmentation.from_pretrained(det_path, local_files_only=not allow_download)
