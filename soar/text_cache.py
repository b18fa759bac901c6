"""Text-embedding cache: every distinct caption encoded once by the text encoders, reused by every run.

The ``embed`` stage encodes the training captions (plus the empty prompt and the validation prompts)
with CLIP x 2 (+ T5 when the model folder has one), in batches, and writes one file::

    {"embeds": [U, L, D], "pooled": [U, P], "captions": [U] (JSON in "meta"), "meta": {...}}

saved with ``torch.save`` and opened with ``torch.load(mmap=True)``: the rows stay in the file's pages
(shared by every process of a node) and a batch reads only its own rows.

The file carries its key: a SHA-256 over the encoders' identity (path, size and SHA-256 of every file
under ``tokenizer*/`` and ``text_encoder*/`` of the model folder), the T5 max length, the transformer's
``joint_attention_dim`` (the CLIP states are zero-padded to it), the storage dtype and this format's
version. Opening the cache recomputes the key from the model folder and refuses a mismatch (a changed
encoder invalidates it); file hashes are reused while a file's size and mtime are unchanged, so the
multi-GB T5 weights are hashed once. A caption missing from the cache is an error naming the caption
and the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from soar import atomic

FORMAT_VERSION = 1
CAPTION_BATCH = 256  # captions per text-encoder call
ENCODER_DIRS = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encoder_manifest(model_dir: str | Path, known: dict | None = None) -> dict[str, dict]:
    """``{relative path: {size, mtime_ns, sha256}}`` of the tokenizer and text-encoder files.

    A file whose size and mtime match its entry in ``known`` keeps that entry's hash (no re-read).
    """
    root, known = Path(model_dir), known or {}
    out = {}
    for sub in ENCODER_DIRS:
        folder = root / sub
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            st = path.stat()
            old = known.get(rel)
            if old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
                digest = old["sha256"]
            else:
                digest = file_sha256(path)
            out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    if not out:
        raise FileNotFoundError(f"{root}: no tokenizer*/ or text_encoder*/ folder to key the text cache on")
    return out


def cache_key(manifest: dict[str, dict], *, t5_max_length: int, joint_attention_dim: int, dtype: str) -> str:
    """The cache's key: encoders' identity (paths + content hashes), lengths, padding width, dtype, format."""
    ident = {"files": {k: v["sha256"] for k, v in sorted(manifest.items())}, "t5_max_length": t5_max_length,
             "joint_attention_dim": joint_attention_dim, "dtype": dtype, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


@dataclass
class TextTable:
    """Encoded captions: ``embeds [U, L, D]`` and ``pooled [U, P]`` (CPU), one row per caption."""

    rows: dict[str, int]
    embeds: torch.Tensor
    pooled: torch.Tensor
    source: str = "in-memory text cache"

    def index(self, captions: Sequence[str]) -> torch.Tensor:
        """Row indices of ``captions``; a missing caption is a ``KeyError`` naming it and the cache."""
        try:
            return torch.tensor([self.rows[c] for c in captions], dtype=torch.long)
        except KeyError as exc:
            raise KeyError(f"caption {exc.args[0]!r} is not in the text-embedding cache {self.source} "
                           f"({len(self.rows)} captions); rebuild it (`dvc repro embed`) from the same "
                           "train.jsonl and validation prompts") from None

    def lookup(self, captions: Sequence[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [B, L, D], pooled [B, P])`` float32 on ``device``, as ``SD3Bundle.encode_prompts`` returns."""
        rows = self.index(captions)
        return (self.embeds[rows].to(device, torch.float32), self.pooled[rows].to(device, torch.float32))


def encode_table(bundle, captions: Iterable[str], dtype: torch.dtype = torch.float32,
                 batch: int = CAPTION_BATCH) -> TextTable:
    """Encode each distinct caption once, ``batch`` captions per encoder call (rows in sorted order)."""
    unique = sorted(set(captions))
    embeds, pooled = [], []
    for lo in range(0, len(unique), batch):
        e, p = bundle.encode_prompts(unique[lo:lo + batch])
        embeds.append(e.to("cpu", dtype))
        pooled.append(p.to("cpu", dtype))
    return TextTable({c: i for i, c in enumerate(unique)}, torch.cat(embeds), torch.cat(pooled))


def build_cache(bundle, model_dir: str | Path, captions: Iterable[str], path: str | Path, *,
                dtype: str = "float32") -> TextTable:
    """Encode ``captions`` with ``bundle``'s encoders (from ``model_dir``) and write the cache to ``path``."""
    manifest = encoder_manifest(model_dir)
    key = cache_key(manifest, t5_max_length=bundle.t5_max_length,
                    joint_attention_dim=bundle.transformer.config.joint_attention_dim, dtype=dtype)
    table = encode_table(bundle, captions, DTYPES[dtype])
    path = Path(path)
    meta = {"key": key, "format": FORMAT_VERSION, "dtype": dtype, "model_dir": str(model_dir),
            "manifest": manifest, "captions": sorted(table.rows, key=table.rows.get)}
    with atomic.atomic_path(path) as tmp:  # never a half-written cache under the final name
        torch.save({"embeds": table.embeds.contiguous(), "pooled": table.pooled.contiguous(),
                    "meta": json.dumps(meta)}, tmp)
    table.source = str(path)
    return table


def load_cache(path: str | Path, model_dir: str | Path, *, t5_max_length: int, joint_attention_dim: int) -> TextTable:
    """Open the cache at ``path`` (memory-mapped) after checking its key against ``model_dir``'s encoders."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text-embedding cache {path} not found: build it with `dvc repro embed` "
                                "(or set data.text_cache: null to encode in memory)")
    data = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    meta = json.loads(data["meta"])
    manifest = encoder_manifest(model_dir, known=meta.get("manifest"))
    key = cache_key(manifest, t5_max_length=t5_max_length, joint_attention_dim=joint_attention_dim,
                    dtype=meta.get("dtype", "float32"))
    if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
        changed = sorted(k for k in set(manifest) | set(meta.get("manifest", {}))
                         if manifest.get(k, {}).get("sha256") != meta.get("manifest", {}).get(k, {}).get("sha256"))
        why = f"encoder files changed: {changed[:5]}" if changed else "max length, padding width or format changed"
        raise ValueError(f"text-embedding cache {path} was built for other text encoders or settings than "
                         f"{model_dir} (t5_max_length={t5_max_length}): {why}; rebuild it with `dvc repro embed`")
    rows = {c: i for i, c in enumerate(meta["captions"])}
    return TextTable(rows, data["embeds"], data["pooled"], str(path))


def free_text_encoders(bundle) -> None:
    """Drop the text encoders from ``bundle`` (and from the accelerator): training reads embeddings only."""
    bundle.offload_text_encoders()
    bundle.clip_encoders, bundle.clip_tokenizers = [], []
    bundle.t5_encoder, bundle.t5_tokenizer = None, None
