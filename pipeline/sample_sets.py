"""Sampling evaluation prompt sets to disk on any number of processes (the sample and dynamics stages).

Each prompt set's entries (prompt i, image j) in file order are cut into fixed batches of
``sample.batch_size``; the batches not complete on disk are dealt round-robin to the processes
(rank r takes every world-size-th one), so no image is made twice and none is padded in. A batch's
composition never depends on the number of processes or on what is already done, so 1 or N
processes and a resumed run give the same bytes (``soar.euler`` explains why that matters).
Image (i, j) starts from its own noise, seeded ``image_seed(sample.seed, i, j)``.

Resuming: every PNG is written atomically, so a rerun after a kill keeps the complete ones and
samples only the batches that miss an image (writing the missing ones). Before anything is written,
the main process checks each set folder's ``sampling.json`` (model digest, sampler settings, prompts,
dtypes, T5 length): other settings empty the folder, and leftover temporary files are removed.

The transformer and the codec run in bf16 on a GPU and in fp32 on the CPU; the text encoders run in
``model.text_encoder_dtype`` and encode ``sample.t5_max_length`` T5 tokens per prompt.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.sample_layout import (
    copy_same_settings,
    folder_digest,
    image_path,
    missing,
    prepare_set_dir,
    save_png,
    write_index,
)
from soar.data.prompts import read_prompt_set
from soar.euler import image_seed, sample
from soar.models.bundle import SD3Bundle, load_bundle
from soar.progress import Progress

NEGATIVE_PROMPT = ""  # the paper's negative prompt
SetPlan = tuple[Path, list[dict]]  # a prompt set's folder and its entries (index lines)
Sampler = Callable[[list[str], list[int]], np.ndarray]  # (prompts, seeds) -> uint8 RGB [N, H, W, 3], one per entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """One forward's worth of entries of one prompt set (fixed by the set and the batch size)."""

    set_name: str
    set_dir: Path
    entries: tuple[dict, ...]


def spread(n: int, k: int | None) -> list[int]:
    """``k`` indices evenly spaced over ``range(n)`` (``i * n // k``, from 0); all ``n`` when k is None or >= n."""
    if k is None or k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def set_entries(set_dir: Path, path: str, fmt: str, images_per_prompt: int, seed: int,
                max_prompts: int | None = None) -> list[dict]:
    """Every image of one prompt set in order (prompt index, then image index), as index lines.

    ``max_prompts``: only that many prompts, evenly spaced in file order (``spread``); they keep their
    index in the file, hence their seeds and folder names.
    """
    items = read_prompt_set(path, fmt)
    entries = []
    for item in (items[i] for i in spread(len(items), max_prompts)):
        for j in range(images_per_prompt):
            entries.append({"prompt_index": item.index, "image_index": j, "prompt": item.prompt,
                            "seed": image_seed(seed, item.index, j), "metadata": item.metadata,
                            "path": str(image_path(set_dir, item.index, j).relative_to(set_dir))})
    return entries


def plan_sets(s, root: Path, max_prompts: int | None = None) -> dict[str, SetPlan]:
    """``{set name: (root/{set}, entries)}`` for every prompt set of the ``sample`` section ``s``."""
    return {name: (root / name, set_entries(root / name, ps.path, ps.format, ps.images_per_prompt, s.seed,
                                            max_prompts))
            for name, ps in s.prompt_sets.items()}


def fixed_batches(set_name: str, set_dir: Path, entries: list[dict], batch_size: int) -> list[Batch]:
    return [Batch(set_name, set_dir, tuple(entries[lo:lo + batch_size])) for lo in range(0, len(entries), batch_size)]


def shard(items: list, rank: int, world: int) -> list:
    """Round-robin share of ``items`` for process ``rank`` of ``world``: disjoint, together all of them."""
    return items[rank::world]


def prompts_digest(entries: list[dict]) -> str:
    """SHA-256 of a set's (prompt index, prompt) lines, in order."""
    return hashlib.sha256("".join(f"{e['prompt_index']}\t{e['prompt']}\n" for e in entries).encode()).hexdigest()


def set_settings(model_digest: str, s, entries: list[dict], dtype: torch.dtype, device: torch.device,
                 text_encoder_dtype: str) -> dict:
    """What the images of one set are a function of; stored as ``sampling.json`` (see module doc)."""
    return {"model": model_digest, "num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale,
            "resolution": s.resolution, "seed": s.seed, "negative_prompt": NEGATIVE_PROMPT,
            "prompts_sha256": prompts_digest(entries), "dtype": str(dtype).removeprefix("torch."),
            "text_encoder_dtype": text_encoder_dtype, "t5_max_length": s.t5_max_length, "device": device.type}


def model_digest(base_path: str | Path, transformer: Path) -> str:
    """The transformer's weights (bytes) and the base folder's file names and sizes (text encoders, codec)."""
    return hashlib.sha256(f"{folder_digest(transformer)}\n{folder_digest(base_path, content=False)}".encode()
                          ).hexdigest()


def sampling_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def open_bundle(cfg, transformer: Path | None, device: torch.device) -> SD3Bundle:
    """The bundle of ``cfg.model.base_path`` (with another ``transformer`` folder when given) on ``device``, for
    sampling: text encoders in ``model.text_encoder_dtype`` with ``sample.t5_max_length`` T5 tokens, the
    transformer and codec in ``sampling_dtype(device)``. ``cfg``: a config with the model and sample sections."""
    bundle = load_bundle(cfg.model.base_path, transformer_path=transformer, t5_max_length=cfg.sample.t5_max_length,
                         text_encoder_dtype=getattr(torch, cfg.model.text_encoder_dtype))
    bundle.to(device)
    dtype = sampling_dtype(device)
    if dtype != torch.float32:
        bundle.transformer.to(dtype)
        bundle.codec.to(dtype)
    return bundle


def bundle_sampler(bundle: SD3Bundle, s) -> Sampler:
    """Our own models' ``Sampler``: ``soar.euler.sample`` with the ``sample`` section ``s``'s settings."""
    def run(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return sample(bundle, prompts, seeds, steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                      resolution=s.resolution, negative_prompt=NEGATIVE_PROMPT)
    return run


def own_settings(s, device: torch.device, text_encoder_dtype: str) -> Callable[[str, list[dict]], dict]:
    """``sample_sets``' ``settings`` for our own models (``set_settings`` with the sampling dtype of ``device``)."""
    return lambda digest, entries: set_settings(digest, s, entries, sampling_dtype(device), device, text_encoder_dtype)


def sample_sets(state, label: str, sets: dict[str, SetPlan], batch_size: int, digest: Callable[[], str],
                settings: Callable[[str, list[dict]], dict], load: Callable[[], Sampler],
                reuse: dict[str, Path] | None = None) -> int:
    """Sample the images of ``sets`` not on disk yet, this process's share; returns the new images of all processes.

    Collective: every process of ``state`` (an accelerate ``PartialState``) calls it. ``digest()`` (main
    process, once) names the model; ``settings(digest, entries)`` is a set's ``sampling.json``; ``load()``
    gives the ``Sampler``, called only when this process has work; batches of ``batch_size`` entries.
    ``reuse``: set name -> a folder sampled before, whose images are copied instead of sampled when its
    ``sampling.json`` is this set's (``copy_same_settings``): not counted as new images.
    """
    if state.is_main_process:
        model = digest()
        for name, (set_dir, entries) in sets.items():
            prepare_set_dir(set_dir, settings(model, entries))
            if reuse and name in reuse and (copied := copy_same_settings(set_dir, reuse[name], entries)):
                log.info("sample %s: %d image(s) of set %s copied from %s (sampled with the same weights and "
                         "settings)", label, copied, name, reuse[name])
    state.wait_for_everyone()  # nobody writes before the folders are checked

    batches = [b for name, (set_dir, entries) in sets.items()
               for b in fixed_batches(name, set_dir, entries, batch_size)]
    todo = [b for b in batches if missing(b.set_dir, list(b.entries))]
    mine = shard(todo, state.process_index, state.num_processes)
    if state.is_main_process:
        total = sum(len(entries) for _, entries in sets.values())
        on_disk = total - sum(len(missing(set_dir, entries)) for set_dir, entries in sets.values())
        log.info("sample %s: %d images in %d set(s), %d on disk; %d batch(es) of <= %d to do on %d process(es)",
                 label, total, len(sets), on_disk, len(todo), batch_size, state.num_processes)
    made = torch.tensor([0], device=state.device)  # new PNGs written by this process
    if mine:
        sampler = load()
        progress = Progress(f"sample {label}", sum(len(b.entries) for b in mine), unit="image",
                            main=state.is_main_process)
        for b in mine:
            entries = list(b.entries)
            try:
                images = sampler([e["prompt"] for e in entries], [e["seed"] for e in entries])
            except FloatingPointError as err:
                raise FloatingPointError(f"sample {label}, set {b.set_name}: {err}") from err
            for e, im in zip(entries, images, strict=True):
                if not (b.set_dir / e["path"]).is_file():  # a resumed batch keeps its complete images
                    save_png(b.set_dir / e["path"], im)
                    made += 1
            progress.advance(len(entries), note=f"set {b.set_name}")
    if state.use_distributed:
        torch.distributed.all_reduce(made)  # also the barrier: every process's images are on disk
    return int(made.item())


def complete_sets(sets: dict[str, SetPlan]) -> None:
    """Main process, after all processes: check every image is there, then write the indexes."""
    for set_dir, entries in sets.values():
        absent = missing(set_dir, entries)
        if absent:
            raise RuntimeError(f"{set_dir}: {len(absent)} image(s) missing after sampling, e.g. {absent[0]['path']}")
        write_index(set_dir, entries)
