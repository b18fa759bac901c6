"""Full-state training checkpoints, written atomically, and how a run finds the one to resume.

``{root}/checkpoint-{step}/`` holds what ``accelerator.save_state`` writes — model weights
(``model.safetensors``, or DeepSpeed's sharded folder), ``optimizer.bin``, ``scheduler.bin``,
``random_states_{rank}.pkl`` (python / numpy / torch / CUDA RNG states of every process) and
``custom_checkpoint_0.pkl`` (the EMA, when registered) — plus one ``trainer_state_{rank}.pt`` per
process (global step, batches this process has consumed = the data-sampler position, and the state
of the step's own ``torch.Generator``) and, written last, the completion marker ``COMPLETE`` (JSON:
step, world size, EMA on/off).

Atomic write: everything goes to the hidden sibling ``.checkpoint-{step}.tmp``; the main process
fsyncs every file, writes and fsyncs the marker, renames the folder to ``checkpoint-{step}`` and
fsyncs ``root``. A crash at any point leaves no ``checkpoint-{step}`` or a complete one, and only
folders holding the marker are ever loaded; leftovers are removed by the next save. ``root`` must be
one filesystem seen by every process (as ``accelerator.save_state`` on several nodes assumes).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from soar import atomic

MARKER = "COMPLETE"
PREFIX = "checkpoint-"
_NAME = re.compile(rf"{PREFIX}(\d+)")


def trainer_state_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"trainer_state_{rank}.pt"


def is_complete(folder: str | Path) -> bool:
    """Whether ``folder`` is a finished checkpoint (holds the completion marker)."""
    return (Path(folder) / MARKER).is_file()


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete ``checkpoint-{step}`` under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)) and is_complete(p)]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (None if there is none)."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(spec: str | None, root: str | Path) -> Path | None:
    """The folder ``train.resume_from_checkpoint`` names: None (fresh), "latest" under ``root`` or a path.

    "latest" with no complete checkpoint gives None (start fresh). A path that does not exist or is
    not a complete checkpoint is an error naming it.
    """
    if spec is None:
        return None
    if spec == "latest":
        return latest_checkpoint(root)
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: checkpoint folder not found: {path}")
    if not is_complete(path):
        raise ValueError(f"resume_from_checkpoint: {path} has no {MARKER} marker (an interrupted write?)")
    return path


def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    with atomic.atomic_open(folder / MARKER, "w") as f:
        json.dump(info, f)


def _commit(tmp: Path, final: Path, info: dict[str, Any]) -> None:
    """fsync ``tmp``'s files and folders, add the marker, rename ``tmp`` to ``final`` (replacing it)."""
    atomic.fsync_tree(tmp)  # everything on disk before the marker is
    _write_marker(tmp, info)
    atomic.replace_folder(tmp, final)  # the same step written before (a resumed run) is replaced


def prune(root: str | Path, total_limit: int | None, keep: Path | None = None) -> None:
    """Delete leftovers of interrupted writes, then the oldest complete checkpoints beyond ``total_limit``.

    ``keep`` (the checkpoint just written) is never deleted and counts towards the limit.
    """
    root = Path(root)
    for stale in root.glob(f".{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if total_limit is None:
        return
    others = [p for _, p in complete_checkpoints(root) if p != keep]
    for folder in others[: max(len(others) - (total_limit - (keep is not None)), 0)]:
        atomic.remove_folder(folder)


def save_checkpoint(accelerator: Accelerator, root: str | Path, step: int, trainer_state: dict[str, Any],
                    total_limit: int | None = None, **meta: Any) -> Path:
    """Write ``{root}/checkpoint-{step}`` atomically from all processes; returns its path.

    Every process calls this (collective). ``trainer_state`` is this process's own state (saved per
    rank); ``meta`` goes into the marker and is checked by ``load_checkpoint``.
    """
    root = Path(root)
    final, tmp = root / f"{PREFIX}{step}", root / f".{PREFIX}{step}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed write of the same step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # main: weights, optimizer, scheduler, EMA; each process: its RNG states
    torch.save(trainer_state, trainer_state_file(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _commit(tmp, final, {"step": step, "world_size": accelerator.num_processes, **meta})
        prune(root, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: str | Path, **meta: Any) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote into the prepared objects; returns this process's state.

    The marker's world size and ``meta`` must match this run (e.g. the same number of processes).
    """
    folder = Path(folder)
    info = json.loads((folder / MARKER).read_text())
    for key, want in {"world_size": accelerator.num_processes, **meta}.items():
        if info.get(key) != want:
            raise ValueError(f"checkpoint {folder} was written with {key}={info.get(key)!r}; this run has {want!r}")
    accelerator.load_state(str(folder))
    return torch.load(trainer_state_file(folder, accelerator.process_index), weights_only=True)
