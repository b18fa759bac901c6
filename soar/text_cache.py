"""Text-embedding cache: every distinct caption encoded once by the text encoders, reused by every run.

The ``embed`` stage encodes the training captions (plus the empty prompt and the validation prompts)
with CLIP x 2 (+ T5 when the model folder has one), in sorted order and batches of ``CAPTION_BATCH``,
into a folder::

    meta.json                 key, format, dtypes, encoder manifest, shapes, shards, captions (in row order)
    shard-00000.safetensors   "embeds" [n, L, D] then "pooled" [n, P] in the storage dtype: rows 0 .. n-1
    shard-00001.safetensors   the next ``shard_rows`` rows, and so on (row r is in shard r // shard_rows)

Each batch is encoded, written at its rows' offsets and freed, so building holds one batch, never the
table. The folder is filled under a temporary name and renamed once complete (``atomic.atomic_folder``):
a failed or killed build never leaves a cache under the final name, and an older cache stays until
the new one replaces it. Shards are plain safetensors files; a lookup reads each row with one
positioned read (``os.preadv``) into a new tensor, so nothing is memory-mapped and the process's
resident memory does not grow with the rows touched over an epoch (the kernel's page cache, shared
and reclaimable, keeps what is hot).

The folder carries its key: a SHA-256 over the encoders' identity (path, size and SHA-256 of every file
under ``tokenizer*/`` and ``text_encoder*/`` of the model folder), the T5 max length, the transformer's
``joint_attention_dim`` (the CLIP states are zero-padded to it), the storage dtype, the dtype the text
encoders ran in and this format's version. Opening the cache recomputes the key from the model folder
and refuses a mismatch (a changed encoder invalidates it); file hashes are reused while a file's size
and mtime are unchanged, so the multi-GB T5 weights are hashed once. A caption missing from the cache
is an error naming the caption and the folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from soar import atomic
from soar.progress import Progress

FORMAT_VERSION = 2
CAPTION_BATCH = 256  # captions per text-encoder call
SHARD_BYTES = 1 << 31  # a shard holds as many rows as fit in 2 GiB (at least one)
META = "meta.json"
ENCODER_DIRS = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ST_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # safetensors' dtype names
REBUILD = "rebuild it with `dvc repro embed`"


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


def cache_key(manifest: dict[str, dict], *, t5_max_length: int, joint_attention_dim: int, dtype: str,
              text_encoder_dtype: str = "float32") -> str:
    """The cache's key: encoders' identity (paths + content hashes), lengths, padding width, dtypes, format."""
    ident = {"files": {k: v["sha256"] for k, v in sorted(manifest.items())}, "t5_max_length": t5_max_length,
             "joint_attention_dim": joint_attention_dim, "dtype": dtype, "text_encoder_dtype": text_encoder_dtype,
             "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


class TextTable:
    """Encoded captions, one row each: ``rows`` (caption -> row), ``source`` (where they are), ``index``, ``lookup``.

    Subclasses implement ``read(rows [B]) -> (embeds [B, L, D], pooled [B, P])`` in their storage dtype.
    """

    rows: dict[str, int]
    source: str

    def index(self, captions: Sequence[str]) -> torch.Tensor:
        """Row indices ``[B]`` of ``captions``; a missing caption is a ``KeyError`` naming it and the cache."""
        try:
            return torch.tensor([self.rows[c] for c in captions], dtype=torch.long)
        except KeyError as exc:
            raise KeyError(f"caption {exc.args[0]!r} is not in the text-embedding cache {self.source} "
                           f"({len(self.rows)} captions); rebuild it (`dvc repro embed`) from the same "
                           "train.jsonl and validation prompts") from None

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def lookup(self, captions: Sequence[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [B, L, D], pooled [B, P])`` float32 on ``device`` (new tensors), as ``encode_prompts`` returns."""
        embeds, pooled = self.read(self.index(captions))
        return embeds.to(device, torch.float32), pooled.to(device, torch.float32)


@dataclass
class MemoryTable(TextTable):
    """A table held in RAM: ``embeds [U, L, D]`` and ``pooled [U, P]`` (CPU)."""

    rows: dict[str, int]
    embeds: torch.Tensor
    pooled: torch.Tensor
    source: str = "in-memory text cache"

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embeds[rows], self.pooled[rows]


def encode_table(bundle, captions: Iterable[str], dtype: torch.dtype = torch.float32,
                 batch: int = CAPTION_BATCH) -> MemoryTable:
    """Encode each distinct caption once, ``batch`` captions per encoder call (rows in sorted order), in RAM."""
    unique = sorted(set(captions))
    embeds, pooled = [], []
    for lo in range(0, len(unique), batch):
        e, p = bundle.encode_prompts(unique[lo:lo + batch])
        embeds.append(e.to("cpu", dtype))
        pooled.append(p.to("cpu", dtype))
    return MemoryTable({c: i for i, c in enumerate(unique)}, torch.cat(embeds), torch.cat(pooled))


@dataclass(frozen=True)
class Layout:
    """Where row ``r`` lies: in shard ``r // shard_rows``, whose data is ``embeds [n, L, D]`` then ``pooled [n, P]``."""

    rows: int
    shard_rows: int
    embed_shape: tuple[int, int]  # (L, D)
    pooled_dim: int  # P
    dtype: str

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def embed_bytes(self) -> int:
        return math.prod(self.embed_shape) * self.itemsize

    @property
    def pooled_bytes(self) -> int:
        return self.pooled_dim * self.itemsize

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def rows_in(self, shard: int) -> int:
        return min(self.shard_rows, self.rows - shard * self.shard_rows)

    def header(self, shard: int) -> bytes:
        """The safetensors header of ``shard`` (8-byte length, JSON padded to 8 bytes)."""
        n, st = self.rows_in(shard), ST_NAMES[self.dtype]
        ne, np_ = n * self.embed_bytes, n * self.pooled_bytes
        head = {"embeds": {"dtype": st, "shape": [n, *self.embed_shape], "data_offsets": [0, ne]},
                "pooled": {"dtype": st, "shape": [n, self.pooled_dim], "data_offsets": [ne, ne + np_]}}
        text = json.dumps(head, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text

    def offsets(self, row: int) -> tuple[int, int, int]:
        """``(shard, byte offset of the row's embeds, of its pooled)`` within the shard file."""
        shard, k = divmod(row, self.shard_rows)
        start = len(self.header(shard))
        return (shard, start + k * self.embed_bytes,
                start + self.rows_in(shard) * self.embed_bytes + k * self.pooled_bytes)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared (writable)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_rows(folder: Path, layout: Layout, first: int, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
    """Write rows ``first ..`` (``embeds [n, L, D]``, ``pooled [n, P]``, storage dtype, all in one shard)."""
    shard, off_e, off_p = layout.offsets(first)
    path = folder / shard_name(shard)
    new = not path.exists()
    with open(path, "wb" if new else "r+b") as f:
        if new:
            f.write(layout.header(shard))
        f.seek(off_e)
        f.write(_as_bytes(embeds.contiguous()))
        f.seek(off_p)
        f.write(_as_bytes(pooled.contiguous()))


def _encoder_dtypes(bundle) -> set[str]:
    """Names of the dtypes ``bundle``'s text encoders hold their (first) weights in; empty when it has none."""
    modules = [*getattr(bundle, "clip_encoders", []), getattr(bundle, "t5_encoder", None)]
    params = [next(m.parameters(), None) for m in modules if m is not None]
    return {str(p.dtype).removeprefix("torch.") for p in params if p is not None}


def build_cache(bundle, model_dir: str | Path, captions: Iterable[str], path: str | Path, *, dtype: str = "float32",
                text_encoder_dtype: str = "float32", batch: int = CAPTION_BATCH,
                shard_rows: int | None = None) -> TextCache:
    """Encode ``captions`` with ``bundle``'s encoders (from ``model_dir``, run in ``text_encoder_dtype``) and write
    the cache folder ``path``, ``batch`` captions at a time, ``shard_rows`` rows per shard (default: 2 GiB)."""
    path = Path(path)
    ran_in = _encoder_dtypes(bundle)
    if ran_in and ran_in != {text_encoder_dtype}:
        raise ValueError(f"build_cache {path}: the bundle's text encoders hold {sorted(ran_in)} weights, not "
                         f"text_encoder_dtype={text_encoder_dtype}; load the bundle in that dtype")
    if path.is_file():
        raise ValueError(f"text-embedding cache {path} is a file (an older format); delete it, the cache is a folder")
    manifest = encoder_manifest(model_dir)
    t5, width = bundle.t5_max_length, bundle.transformer.config.joint_attention_dim
    unique = sorted(set(captions))
    meta = {"key": cache_key(manifest, t5_max_length=t5, joint_attention_dim=width, dtype=dtype,
                             text_encoder_dtype=text_encoder_dtype),
            "format": FORMAT_VERSION, "dtype": dtype, "text_encoder_dtype": text_encoder_dtype, "t5_max_length": t5,
            "joint_attention_dim": width, "model_dir": str(model_dir), "manifest": manifest}
    layout = None
    progress = Progress(f"text cache {path}", len(unique), unit="caption")
    with atomic.atomic_folder(path) as tmp:  # never a half-written cache under the final name
        for lo in range(0, len(unique), batch):
            e, p = bundle.encode_prompts(unique[lo:lo + batch])
            e, p = e.to("cpu", DTYPES[dtype]), p.to("cpu", DTYPES[dtype])
            if layout is None:
                row_bytes = (e[0].numel() + p[0].numel()) * e.element_size()
                layout = Layout(len(unique), shard_rows or max(1, SHARD_BYTES // row_bytes),
                                tuple(e.shape[1:]), p.shape[1], dtype)
            row = lo
            while row < lo + len(e):  # split the batch at shard boundaries
                end = min(lo + len(e), (row // layout.shard_rows + 1) * layout.shard_rows)
                write_rows(tmp, layout, row, e[row - lo:end - lo], p[row - lo:end - lo])
                row = end
            progress.advance(len(e))
            del e, p
        if layout is None:
            raise ValueError(f"build_cache {path}: no captions to encode")
        meta |= {"rows": layout.rows, "shard_rows": layout.shard_rows, "embeds": list(layout.embed_shape),
                 "pooled": [layout.pooled_dim], "shards": [shard_name(s) for s in range(layout.shards)],
                 "captions": unique}
        (tmp / META).write_text(json.dumps(meta))
    return TextCache(path, meta)


class TextCache(TextTable):
    """The ``embed`` stage's folder, read row by row: ``embeds [U, L, D]``, ``pooled [U, P]`` in its storage dtype.

    Shards are opened on first use (one descriptor each, per process; not pickled). ``nbytes``: the shards' size.
    """

    def __init__(self, path: str | Path, meta: dict):
        self._fds: dict[int, int] = {}
        self.source = str(path)
        self.rows = {c: i for i, c in enumerate(meta["captions"])}
        self.layout = Layout(meta["rows"], meta["shard_rows"], tuple(meta["embeds"]), meta["pooled"][0], meta["dtype"])
        self.paths = [Path(path) / name for name in meta["shards"]]
        for shard, shard_path in enumerate(self.paths):  # complete, and the shape the meta says
            want = self.layout.header(shard)
            expected = len(want) + self.layout.rows_in(shard) * (self.layout.embed_bytes + self.layout.pooled_bytes)
            with open(shard_path, "rb") as f:
                ok = f.read(len(want)) == want and os.fstat(f.fileno()).st_size == expected
            if not ok:
                raise ValueError(f"text-embedding cache {path}: {shard_path.name} is truncated or not this "
                                 f"cache's shard; {REBUILD}")
        self.nbytes = sum(p.stat().st_size for p in self.paths)

    @property
    def embeds_shape(self) -> tuple[int, int, int]:
        return (self.layout.rows, *self.layout.embed_shape)

    @property
    def pooled_shape(self) -> tuple[int, int]:
        return (self.layout.rows, self.layout.pooled_dim)

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def _pread(self, shard: int, out: torch.Tensor, offset: int) -> None:
        buf, done = _as_bytes(out), 0
        while done < len(buf):  # a read may return fewer bytes than asked
            got = os.preadv(self._fd(shard), [buf[done:]], offset + done)
            if got == 0:
                raise ValueError(f"text-embedding cache {self.source}: {self.paths[shard].name} ended early; {REBUILD}")
            done += got

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [B, L, D], pooled [B, P])``: new tensors, one positioned read per row and part."""
        dtype = DTYPES[self.layout.dtype]
        embeds = torch.empty((len(rows), *self.layout.embed_shape), dtype=dtype)
        pooled = torch.empty((len(rows), self.layout.pooled_dim), dtype=dtype)
        for i, row in enumerate(rows.tolist()):
            shard, off_e, off_p = self.layout.offsets(row)
            self._pread(shard, embeds[i], off_e)
            self._pread(shard, pooled[i], off_p)
        return embeds, pooled

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}


def load_cache(path: str | Path, model_dir: str | Path, *, t5_max_length: int, joint_attention_dim: int,
               text_encoder_dtype: str = "float32") -> TextCache:
    """Open the cache folder ``path`` after checking its key against ``model_dir``'s encoders and the settings."""
    path = Path(path)
    if path.is_file():
        raise ValueError(f"text-embedding cache {path} is a file (an older format); delete it and {REBUILD}")
    if not (path / META).is_file():
        raise FileNotFoundError(f"text-embedding cache {path} not found: build it with `dvc repro embed` "
                                "(or set data.text_cache: null to encode in memory)")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"text-embedding cache {path} has format {meta.get('format')}, this code reads "
                         f"{FORMAT_VERSION}; {REBUILD}")
    manifest = encoder_manifest(model_dir, known=meta["manifest"])
    key = cache_key(manifest, t5_max_length=t5_max_length, joint_attention_dim=joint_attention_dim,
                    dtype=meta["dtype"], text_encoder_dtype=text_encoder_dtype)
    if meta["key"] != key:
        changed = sorted(k for k in set(manifest) | set(meta["manifest"])
                         if manifest.get(k, {}).get("sha256") != meta["manifest"].get(k, {}).get("sha256"))
        now = {"t5_max_length": t5_max_length, "joint_attention_dim": joint_attention_dim,
               "text_encoder_dtype": text_encoder_dtype}
        diffs = [f"{k} {meta[k]} (now {v})" for k, v in now.items() if meta[k] != v]
        why = (f"encoder files changed: {changed[:5]}" if changed else
               "built with " + ", ".join(diffs) if diffs else "its key differs")
        raise ValueError(f"text-embedding cache {path} was built for other text encoders or settings than "
                         f"{model_dir}: {why}; {REBUILD}")
    return TextCache(path, meta)


def free_text_encoders(bundle) -> None:
    """Drop the text encoders from ``bundle`` (and from the accelerator): training reads embeddings only."""
    bundle.offload_text_encoders()
    bundle.clip_encoders, bundle.clip_tokenizers = [], []
    bundle.t5_encoder, bundle.t5_tokenizer = None, None
