"""VAE latent cache: each training image's posterior moments encoded once, reused by every run.

With ``data.latent_cache`` set, the trainer asks the cache for every record before step 1; images not
yet encoded are encoded (each process its share, in same-bucket batches) and written, one file per
image and bucket::

    {root}/{key[:16]}/{md5}_{bw}x{bh}.safetensors   tensors "mean", "std": float32 [C, bh/8, bw/8]

Training then draws ``z0 = mean + std * eps`` (``codec.sample_moments``) with the step's generator:
the same draws as encoding the pixels each time (``codec.encode`` is that composition), without the
VAE forward; the moments equal the uncached ones up to the VAE's float rounding, which on CPU can
depend on which images share a batch (~1e-7). ``key`` hashes the codec's files (``vae/`` or
``codec/`` of the model folder), the image preprocessing version and this format, so a changed VAE
or resize never reads stale latents; the image itself is identified by its ``md5`` (the JSONL's
content hash). Files are written to a temporary name and renamed, so a killed build leaves only
complete entries and the next run encodes the rest.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from soar import atomic
from soar.data.dataset import ImageCaptionDataset, collate
from soar.data.jsonl import TrainingRecord
from soar.text_cache import file_sha256

FORMAT_VERSION = 1
PREPROCESS_VERSION = 2  # soar.data.images.load_rgb + dataset.resize_center_crop + to_pixels; bump when they change
CODEC_DIRS = ("vae", "codec")


def codec_key(model_dir: str | Path) -> str:
    """SHA-256 over the codec's files (relative path + content hash), preprocessing and format versions."""
    root = Path(model_dir)
    files = {p.relative_to(root).as_posix(): file_sha256(p) for sub in CODEC_DIRS if (root / sub).is_dir()
             for p in sorted((root / sub).rglob("*")) if p.is_file()}
    if not files:
        raise FileNotFoundError(f"{root}: no vae/ or codec/ folder to key the latent cache on")
    ident = {"files": files, "preprocess": PREPROCESS_VERSION, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


class LatentCache:
    """The cache folder of one codec (``root/key[:16]``)."""

    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key[:16]

    def path(self, record: TrainingRecord) -> Path:
        return self.dir / f"{record.md5}_{record.bw}x{record.bh}.safetensors"

    def missing(self, records: Sequence[TrainingRecord]) -> list[int]:
        """Indices of ``records`` with no complete entry."""
        return [i for i, r in enumerate(records) if not self.path(r).is_file()]

    def load(self, record: TrainingRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` float32 ``[C, h, w]`` of one image."""
        path = self.path(record)
        if not path.is_file():
            raise FileNotFoundError(f"latent cache entry {path} missing for image {record.md5} "
                                    f"(line {record.line}); the trainer builds it before step 1")
        data = load_file(path)
        return data["mean"], data["std"]

    def write(self, record: TrainingRecord, mean: torch.Tensor, std: torch.Tensor) -> None:
        with atomic.atomic_path(self.path(record)) as tmp:
            save_file({"mean": mean.contiguous().cpu(), "std": std.contiguous().cpu()}, tmp)

    def build(self, codec, dataset: ImageCaptionDataset, indices: Sequence[int], device: torch.device | str,
              batch_size: int) -> int:
        """Encode ``dataset[indices]`` (same-bucket batches of ``batch_size``) and write them; returns the count."""
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in indices:
            by_bucket[dataset.records[i].bucket].append(i)
        for bucket_indices in by_bucket.values():
            for lo in range(0, len(bucket_indices), batch_size):
                chunk = bucket_indices[lo:lo + batch_size]
                batch = collate([dataset.pixel_item(i) for i in chunk])
                mean, std = codec.moments(batch["pixels"].to(device))
                for j, i in enumerate(chunk):
                    self.write(dataset.records[i], mean[j], std[j])
        return len(indices)
