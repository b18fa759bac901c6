"""Image + caption dataset over aspect-ratio buckets, and a bucket-aware distributed batch sampler.

``ImageCaptionDataset`` loads ``image_dir/{md5}.jpg`` (decoded by ``soar.data.images``), resizes it
(aspect kept) until it covers its bucket ``(bw, bh)`` and centre-crops to exactly ``bh x bw``. A missing or
unreadable image is an ``ImageLoadError`` (``soar.data.images``) naming the file; nothing is ever substituted.

``BucketBatchSampler`` makes batches whose members share one bucket, shuffles them with a
generator seeded by ``(seed, epoch)``, and deals them round-robin to ranks: every rank gets
disjoint batches and the same number of them. ``set_epoch(epoch, start_batch=k)`` resumes
an interrupted epoch at this rank's k-th batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from soar.data.images import RESAMPLE, load_rgb
from soar.data.jsonl import TrainingRecord

PIXEL_SCALE = 127.5  # uint8 [0, 255] -> float [-1, 1]: x / 127.5 - 1


def resize_center_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale uint8 ``[H, W, 3]`` (aspect kept, bicubic) to cover ``width x height``, then centre-crop.

    Returns uint8 ``[height, width, 3]``.
    """
    src_h, src_w = image.shape[:2]
    factor = max(width / src_w, height / src_h)
    new_w = max(width, round(src_w * factor))
    new_h = max(height, round(src_h * factor))
    resized = Image.fromarray(image).resize((new_w, new_h), RESAMPLE)
    left = (new_w - width) // 2
    top = (new_h - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)))


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float32 tensor ``[3, H, W]`` in [-1, 1]."""
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()  # copy: writable
    return tensor / PIXEL_SCALE - 1.0


class ImageCaptionDataset(Dataset):
    """``records[i]`` -> ``{"pixels": float32 [3, bh, bw] in [-1, 1], "caption": str, "md5": str}``.

    With ``latents`` (a ``soar.latent_cache.LatentCache``) items carry the cached posterior moments
    ``"mean"``, ``"std"`` (float32 ``[C, h, w]``) instead of pixels. ``memory_bytes``: decoded, cropped images
    (uint8) are kept in memory up to this many bytes, first come first kept, and never decoded again; the
    pixels are the same either way (0 = decode on every access).
    """

    def __init__(self, records: Sequence[TrainingRecord], image_dir: str | Path, latents=None, memory_bytes: int = 0):
        if not records:
            raise ValueError(f"ImageCaptionDataset over {image_dir}: no records")
        self.records = list(records)
        self.image_dir = Path(image_dir)
        self.latents = latents
        self.memory_bytes = memory_bytes
        self._kept: dict[int, np.ndarray] = {}
        self._kept_bytes = 0

    def __len__(self) -> int:
        return len(self.records)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """``(bw, bh)`` of every index, for ``BucketBatchSampler``."""
        return [r.bucket for r in self.records]

    def pixel_item(self, index: int) -> dict[str, Any]:
        """The item with its pixels, whether or not a latent cache is set."""
        record = self.records[index]
        return {"pixels": to_pixels(self.crop(index)), "caption": record.caption, "md5": record.md5}

    def crop(self, index: int) -> np.ndarray:
        """Image ``index`` decoded, resized and cropped to its bucket: uint8 ``[bh, bw, 3]`` (kept while the
        memory budget lasts; callers must not write to it)."""
        kept = self._kept.get(index)
        if kept is not None:
            return kept
        record = self.records[index]
        crop = resize_center_crop(load_rgb(record.image_path(self.image_dir)), record.bw, record.bh)
        if self._kept_bytes + crop.nbytes <= self.memory_bytes:
            self._kept[index] = crop
            self._kept_bytes += crop.nbytes
        return crop

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.latents is None:
            return self.pixel_item(index)
        record = self.records[index]
        mean, std = self.latents.load(record)
        return {"mean": mean, "std": std, "caption": record.caption, "md5": record.md5}


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a same-bucket batch: ``pixels`` float32 ``[B, 3, H, W]`` (or cached ``mean``/``std``
    ``[B, C, h, w]``), ``captions`` and ``md5s`` lists."""
    tensors = [k for k in ("pixels", "mean", "std") if k in items[0]]
    shapes = {tuple(item[tensors[0]].shape) for item in items}
    if len(shapes) != 1:
        ids = [item["md5"] for item in items]
        raise ValueError(f"collate: batch mixes image shapes {sorted(shapes)} (md5s {ids})")
    out = {k: torch.stack([item[k] for item in items]) for k in tensors}
    out.update(captions=[item["caption"] for item in items], md5s=[item["md5"] for item in items])
    return out


def unusable_buckets(buckets: Sequence[tuple[int, int]], batch_size: int, world_size: int,
                     key: str = "train.train_batch_size") -> dict[tuple[int, int], int]:
    """``{bucket: images}`` of the buckets too small for one batch of ``batch_size`` (``BucketBatchSampler`` never
    draws them); raises ``ValueError`` naming ``key`` when they leave fewer batches than ``world_size``."""
    sizes: dict[tuple[int, int], int] = defaultdict(int)
    for bucket in buckets:
        sizes[tuple(bucket)] += 1
    batches = sum(n // batch_size for n in sizes.values())
    if batches < world_size:
        largest = max(sizes.values(), default=0)
        raise ValueError(f"{key} is {batch_size} but the largest bucket holds {largest} image(s) "
                         f"({len(buckets)} in {len(sizes)} bucket(s)): {batches} full batch(es) for {world_size} "
                         f"process(es); lower {key} to at most {largest // world_size or 1}")
    return {b: n for b, n in sorted(sizes.items()) if n < batch_size}


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, one bucket per batch, split across ranks.

    Per epoch: each bucket's indices are shuffled and cut into batches of ``batch_size``
    (an incomplete tail is dropped when ``drop_last``, else kept as a smaller batch); all
    batches are shuffled together. The generator is seeded by ``(seed, epoch)`` only, so all
    ranks build the same global list. Rank ``r`` takes batches ``r, r + W, r + 2W, ...`` of
    that list cut to a multiple of ``W = world_size`` (with ``drop_last``: the last
    ``len % W`` batches are dropped; without: the first batches are repeated to pad it).
    """

    def __init__(
        self,
        buckets: Sequence[tuple[int, int]],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, bucket in enumerate(buckets):
            groups[tuple(bucket)].append(index)
        self._groups = [np.asarray(groups[key]) for key in sorted(groups)]
        self._global_batches = sum(self._batches_in(len(g)) for g in self._groups)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"BucketBatchSampler: {len(buckets)} samples in {len(self._groups)} buckets give "
                f"{self._global_batches} batches of {batch_size}, fewer than world_size {world_size}"
            )
        self.epoch = 0
        self.start_batch = 0

    def _batches_in(self, count: int) -> int:
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets in a full epoch (the same for every rank and every epoch)."""
        if self.drop_last:
            return self._global_batches // self.world_size
        return -(-self._global_batches // self.world_size)

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Select the epoch's order; ``start_batch`` skips this rank's first batches (resume)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def locate(self, batches_done: int) -> tuple[int, int]:
        """``(epoch, start_batch)`` after this rank has consumed ``batches_done`` batches in total."""
        return divmod(int(batches_done), self.batches_per_epoch)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's shuffled batches over all ranks, before the split (same on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for group in self._groups:
            order = group[rng.permutation(len(group))]
            for start in range(0, self._batches_in(len(group)) * self.batch_size, self.batch_size):
                batches.append(order[start : start + self.batch_size].tolist())
        return [batches[i] for i in rng.permutation(len(batches))]

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's full list of batches for ``epoch`` (length ``batches_per_epoch``)."""
        batches = self.global_batches(epoch)
        total = self.batches_per_epoch * self.world_size
        while len(batches) < total:  # only without drop_last: pad by repeating from the start
            batches.extend(batches[: total - len(batches)])
        return batches[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.rank_batches(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        """Batches left in the current epoch from ``start_batch``."""
        return self.batches_per_epoch - self.start_batch
