"""GenEval's detector at its real size on this machine: load time of an mmdetection-format Swin-S Mask2Former
file through the converter, and one detector forward.

    python benchmarks/geneval_detector.py --threads 1

The file is random weights in the real checkpoint's layout (``tests/mmdet_layout.py``, the layout the tests
build: 649 tensors, 68.8 M values), written to a temporary folder; prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the mmdetection layout of the tests

from mmdet_layout import Arch, random_mask2former, save_checkpoint  # noqa: E402

from soar.rewards.geneval_m2f import MMDET_CHECKPOINT, detector_input  # noqa: E402
from soar.rewards.mmdet_mask2former import load_mmdet_mask2former  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--side", type=int, default=512, help="image side of the forward, pixels")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp) / MMDET_CHECKPOINT, random_mask2former(Arch()).state_dict())
        print(f"mmdetection-format file: {os.path.getsize(path) / 2**20:.0f} MiB; peak RSS so far {peak_gib():.2f} GiB")
        tic = time.perf_counter()
        model = load_mmdet_mask2former(path)
        print(f"load_mmdet_mask2former: {time.perf_counter() - tic:.1f} s, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, peak RSS {peak_gib():.2f} GiB")
    pixels, resized = detector_input(np.zeros((1, args.side, args.side, 3), np.uint8))
    with torch.no_grad():
        tic = time.perf_counter()
        model(pixel_values=pixels)
    print(f"one {args.side} px image ({resized[0]}x{resized[1]} input, padded {tuple(pixels.shape[-2:])}): "
          f"{time.perf_counter() - tic:.1f} s on {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
