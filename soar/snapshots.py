"""Weights-only snapshots of a training run, for training-dynamics curves (reward vs step).

Every ``snapshot_steps`` optimiser steps the trainer saves the weights sampling would use at that
step (the EMA weights when an EMA is on; with LoRA the adapters merged into the base) to
``{out_dir}/snapshots/step-{N:06d}/transformer`` in diffusers format (with LoRA the adapters also
go to ``transformer_lora`` beside it). Unlike full-state checkpoints (``soar.checkpoint``: optimiser,
RNG, pruned to the newest few) snapshots hold no training state and are all kept.

Saving never touches the training weights: the model is copied to the CPU (the EMA shadow in place
of the trained parameters) and the copy is saved, through the same ``soar.finetune.save_model`` as
the final ``transformer/``. A snapshot is written to a hidden temporary folder, fsync'd and renamed
(``soar.atomic.atomic_folder``), so a ``step-*`` folder is always complete; saving a step again (a
resumed run) replaces it.
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from soar.atomic import atomic_folder
from soar.finetune import LoraConfig, save_model

SNAPSHOT_DIR = "snapshots"  # under the training run's output folder
TRANSFORMER = "transformer"  # the diffusers folder inside each snapshot
_NAME = re.compile(r"step-(\d+)")


def snapshot_folder(out_dir: str | Path, step: int) -> Path:
    """``{out_dir}/snapshots/step-{step:06d}``."""
    return Path(out_dir) / SNAPSHOT_DIR / f"step-{step:06d}"


def missing_steps(steps: Sequence[int]) -> list[int]:
    """The steps a run that saved ``steps`` (sorted, every ``snapshot_steps`` = ``steps[0]``) should also have."""
    if not steps:
        return []
    every = steps[0]
    return sorted(set(range(every, steps[-1] + 1, every)) - set(steps))


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete the hidden ``.step-*.tmp`` / ``.step-*.old`` folders a killed snapshot write leaves; returns them."""
    root = Path(out_dir) / SNAPSHOT_DIR
    stale = sorted(root.glob(".step-*.tmp")) + sorted(root.glob(".step-*.old")) if root.is_dir() else []
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def list_snapshots(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, transformer folder)`` of every snapshot under ``out_dir``, in step order ([] when none)."""
    root = Path(out_dir) / SNAPSHOT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p / TRANSFORMER) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return sorted(found)


@torch.no_grad()
def cpu_copy(model: torch.nn.Module, replace: Mapping[int, torch.Tensor] | None = None) -> torch.nn.Module:
    """A deep copy of ``model`` whose tensors are on the CPU, made without a second copy on the model's device.

    ``replace`` maps ``id(parameter)`` to a tensor whose values the copy's parameter takes instead
    (cast to the parameter's dtype), e.g. the EMA shadow. ``model`` itself is not modified.
    """
    replace = replace or {}
    memo: dict[int, object] = {}  # deepcopy takes these tensors for the originals it meets
    for p in model.parameters():
        values = replace.get(id(p), p).detach().to("cpu", p.dtype, copy=True)
        memo[id(p)] = torch.nn.Parameter(values, requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo)


def write_snapshot(model: torch.nn.Module, out_dir: str | Path, step: int, lora: LoraConfig | None) -> Path:
    """Save ``model`` (a copy: LoRA is merged into it in place) as the snapshot of ``step``; returns its folder."""
    final = snapshot_folder(out_dir, step)
    with atomic_folder(final) as tmp:  # the same step of a resumed run is replaced
        save_model(model, tmp / TRANSFORMER, lora)
    return final
