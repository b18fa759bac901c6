"""Disk a post-training run takes per method: measured on a finished output folder, scaled to SD3.5-Medium.

    python benchmarks/paper_disk.py data/models/soar                  # this run, and the paper profile's sizes
    python benchmarks/paper_disk.py OUT --snapshots 10 --checkpoints 2

Reads ``OUT`` = ``{model.models_dir}/{method}`` after ``train@{method}`` (full fine-tuning, DDP or one process):
the final ``transformer/`` (and ``transformer_raw/`` with an EMA), every ``snapshots/step-*/`` and every
``checkpoints/checkpoint-*/``. Each kind of folder is predicted from two counts of the transformer's config:
E, the elements it saves (parameters and persistent buffers such as SD3's ``pos_embed``), and P, its
trainable parameters:

    transformer/, transformer_raw/, one snapshot   4 E                 (float32 safetensors)
    one checkpoint                                 4 E + 8 P (+ 4 P)   (weights, AdamW's two moments, the EMA)

The prediction is printed beside the measured size; the difference is headers, configs, pickling and RNG states,
kilobytes per folder whatever the model's size,
then applied to SD3.5-Medium's transformer config with the paper profile's counts (5000 steps / snapshot_steps
500 = 10 snapshots; checkpoints_total_limit 2; no EMA).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import SD3Transformer2DModel

# transformer/config.json of stabilityai/stable-diffusion-3.5-medium (diffusers layout)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
GB = 1e9


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def counts(config: dict) -> tuple[int, int]:
    """(E, P): elements of the state dict and trainable parameters of an SD3 transformer built on the meta device."""
    with init_empty_weights():
        model = SD3Transformer2DModel.from_config(config)
    return sum(t.numel() for t in model.state_dict().values()), sum(p.numel() for p in model.parameters())


def predicted(kind: str, e: int, p: int, ema: bool) -> int:
    return 4 * e + (8 * p + 4 * p * ema if kind == "one checkpoint" else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a finished train@ output folder, e.g. data/models/soar")
    parser.add_argument("--snapshots", type=int, default=10, help="snapshots kept at SD3.5 size")
    parser.add_argument("--checkpoints", type=int, default=2, help="checkpoints kept at SD3.5 size")
    parser.add_argument("--ema", action="store_true", help="SD3.5 size with train.ema_decay set")
    args = parser.parse_args()
    out = args.out
    if not (out / "transformer" / "config.json").is_file():
        raise SystemExit(f"{out}: no transformer/config.json (expected a finished train@ output folder)")
    e, p = counts(json.loads((out / "transformer" / "config.json").read_text()))
    ema = (out / "transformer_raw").is_dir()
    kinds = {"transformer/": [out / "transformer"], "transformer_raw/": [out / "transformer_raw"] if ema else [],
             "one snapshot": sorted((out / "snapshots").glob("step-*")),
             "one checkpoint": sorted((out / "checkpoints").glob("checkpoint-*"))}
    print(f"{out}: E = {e:,} saved elements, P = {p:,} parameters, EMA {'on' if ema else 'off'}, "
          f"{folder_bytes(out) / 2**20:.2f} MiB in all (torch {torch.__version__})")
    print("| folder | measured (mean of n) | predicted | measured - predicted |")
    print("|---|---|---|---|")
    for kind, folders in kinds.items():
        if not folders:
            print(f"| {kind} | none here | | |")
            continue
        size = sum(folder_bytes(f) for f in folders) / len(folders)
        guess = predicted(kind, e, p, ema)
        print(f"| {kind} | {size / 2**10:.1f} KiB ({len(folders)}) | {guess / 2**10:.1f} KiB | "
              f"{(size - guess) / 2**10:.1f} KiB |")

    e, p = counts(SD35_MEDIUM)
    kept = {"transformer/": 1, "transformer_raw/": int(args.ema), "one snapshot": args.snapshots,
            "one checkpoint": args.checkpoints}
    print(f"\nSD3.5-Medium transformer: E = {e / GB:.3f} B, P = {p / GB:.3f} B; EMA {'on' if args.ema else 'off'}")
    print("| folder | size | kept | GB |")
    print("|---|---|---|---|")
    total = 0
    for kind, n in kept.items():
        size = predicted(kind, e, p, args.ema)
        total += n * size
        print(f"| {kind} | {size / GB:.1f} GB | {n} | {n * size / GB:.1f} |")
    print(f"| per method | | | **{total / GB:.0f}** |")


if __name__ == "__main__":
    main()
