"""Memory of the text-embedding cache at SD3.5-Medium's width: file size, peak RSS building, peak RSS reading.

A random stand-in encoder returns SD3.5's shapes (``embeds [B, 154, 4096]``, ``pooled [B, 2048]``,
float32); the cache code is the real one (``soar.text_cache.build_cache`` / ``load_cache``), stored in
bfloat16 (1.26 MB per caption). Each measurement runs in its own subprocess and reports that process's
peak resident set (``VmHWM``): building the cache, then reading it as the trainer does (``--lookups``
lookups of ``--batch`` random captions). The old format (one tensor in RAM, one ``torch.save``, read
with ``torch.load(mmap=True)``) is measured too where it fits in RAM (``--old-max`` captions at most).
Sizes that do not fit on the disk are skipped with the reason; each size's files are deleted after it.

    python benchmarks/text_cache_memory.py                      # 1k, 10k, 50k captions
    python benchmarks/text_cache_memory.py --sizes 1000 --old-max 1000 --dir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

from soar.text_cache import build_cache, encode_table, load_cache

TOKENS, WIDTH, POOLED = 154, 4096, 2048  # SD3.5 Medium: 77 CLIP + 77 T5 tokens, joint_attention_dim, 2 x CLIP pooled
ROW_BYTES = (TOKENS * WIDTH + POOLED) * 2  # bfloat16 storage
BANK = 8  # distinct random rows the stand-in draws from


class RandomEncoder:
    """Stand-in for ``SD3Bundle``: ``encode_prompts(prompts) -> (embeds [B, 154, 4096], pooled [B, 2048])`` float32,
    each prompt's row one of ``BANK`` random rows (picked by its CRC-32), new tensors per call as an encoder's are."""

    t5_max_length = 77
    transformer = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=WIDTH))

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.embeds = torch.randn(BANK, TOKENS, WIDTH, generator=g)
        self.pooled = torch.randn(BANK, POOLED, generator=g)

    def rows(self, prompts) -> torch.Tensor:
        return torch.tensor([zlib.crc32(p.encode()) % BANK for p in prompts])

    def encode_prompts(self, prompts):
        rows = self.rows(prompts)
        return self.embeds[rows], self.pooled[rows]


def captions(n: int) -> list[str]:
    return [f"a photo of caption number {i:07d}" for i in range(n)]


def peak_rss() -> int:
    """This process's peak resident set in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def model_dir(work: Path) -> Path:
    """A model folder whose only encoder file is the stand-in's description (the cache's key hashes it)."""
    (work / "model" / "text_encoder").mkdir(parents=True, exist_ok=True)
    (work / "model" / "text_encoder" / "config.json").write_text(json.dumps({"stand_in": "random", "bank": BANK}))
    return work / "model"


def child(task: str, n: int, work: Path, lookups: int, batch: int) -> dict:
    """One measurement; returns ``{seconds, peak_rss, base_rss[, bytes]}``."""
    torch.set_num_threads(1)
    base, encoder, names = peak_rss(), RandomEncoder(), captions(n)
    tic = time.perf_counter()
    out = {}
    if task == "build-new":
        table = build_cache(encoder, model_dir(work), names, work / "cache", dtype="bfloat16")
        out["bytes"] = table.nbytes
    elif task == "build-old":
        table = encode_table(encoder, names, torch.bfloat16)
        torch.save({"embeds": table.embeds, "pooled": table.pooled, "meta": json.dumps({"captions": names})},
                   work / "cache.pt")
        out["bytes"] = (work / "cache.pt").stat().st_size
    else:
        rng = random.Random(0)
        if task == "read-new":
            table = load_cache(work / "cache", model_dir(work), t5_max_length=77, joint_attention_dim=WIDTH)
            lookup = table.lookup
        else:
            data = torch.load(work / "cache.pt", mmap=True, weights_only=True, map_location="cpu")
            rows = {c: i for i, c in enumerate(sorted(names))}

            def lookup(cs):
                index = torch.tensor([rows[c] for c in cs])
                return data["embeds"][index].float(), data["pooled"][index].float()
        for _ in range(lookups):
            picked = rng.sample(names, batch)
            embeds, pooled = lookup(picked)
        want = encoder.embeds[encoder.rows(picked)].to(torch.bfloat16).float()
        if not torch.equal(embeds, want) or embeds.shape != (batch, TOKENS, WIDTH):
            raise SystemExit(f"{task}: the cache returned other rows than the encoder gave")
    return {**out, "seconds": time.perf_counter() - tic, "peak_rss": peak_rss(), "base_rss": base}


def measure(task: str, n: int, work: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", task, "--sizes", str(n), "--dir", str(work),
           "--lookups", str(args.lookups), "--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 50_000], help="captions per cache")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--lookups", type=int, default=2000, help="training-style lookups per read measurement")
    parser.add_argument("--batch", type=int, default=4, help="captions per lookup")
    parser.add_argument("--old-max", type=int, default=10_000, help="largest size to measure the old format at")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.sizes[0], args.dir, args.lookups, args.batch)))
        return
    root = Path(tempfile.mkdtemp(prefix="text_cache_bench_", dir=args.dir))
    print(f"{TOKENS} x {WIDTH} tokens + {POOLED} pooled, bfloat16: {ROW_BYTES / 1e6:.2f} MB per caption; "
          f"reading = {args.lookups} lookups of {args.batch} random captions; writing under {root}", flush=True)
    print("| captions | format | file size | peak RSS building | build time | peak RSS reading | read time |")
    print("|---|---|---|---|---|---|---|", flush=True)
    base = None
    try:
        for n in args.sizes:
            need = n * ROW_BYTES
            formats = [("new", "folder of shards, positioned reads")]
            if n <= args.old_max:
                formats.append(("old", "one tensor, torch.save, mmap"))
            for fmt, label in formats:
                free = shutil.disk_usage(root).free
                if need + (4 << 30) > free:
                    print(f"| {n} | {label} | skipped: needs {gb(need)} + 4 GB margin, {gb(free)} free on disk |"
                          " | | | |", flush=True)
                    continue
                if fmt == "old" and 2 * need + (2 << 30) > mem_available():
                    print(f"| {n} | {label} | skipped: building holds ≈ 2 x {gb(need)}, "
                          f"{gb(mem_available())} RAM available | | | | |", flush=True)
                    continue
                work = root / f"{fmt}-{n}"
                work.mkdir()
                try:
                    built = measure(f"build-{fmt}", n, work, args)
                    read = measure(f"read-{fmt}", n, work, args) if "error" not in built else built
                finally:
                    shutil.rmtree(work)
                if "error" in built or "error" in read:
                    print(f"| {n} | {label} | failed: {built.get('error') or read.get('error')} | | | | |", flush=True)
                    continue
                base = built["base_rss"]
                print(f"| {n} | {label} | {gb(built['bytes'])} | {gb(built['peak_rss'])} | {built['seconds']:.1f} s "
                      f"| {gb(read['peak_rss'])} | {read['seconds']:.1f} s |", flush=True)
        if base is not None:
            print(f"(a measuring process's RSS after importing torch and making the stand-in encoder: {gb(base)})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
