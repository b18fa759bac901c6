"""Stage `sample@{base,sft,soar}`: images for every prompt set, one fixed seed per image, on any number of processes.

    python -m stages.sample base                                                  # one process
    accelerate launch --config_file pipeline/launch/multi_gpu.yaml --num_processes 8 -m stages.sample base
    torchrun --nproc_per_node 8 -m stages.sample base                             # same thing

Each prompt set's entries (prompt i, image j) in file order are cut into fixed batches of
``sample.batch_size``; the batches not complete on disk are dealt round-robin to the processes
(rank r takes every world-size-th one), so no image is made twice and none is padded in. A batch's
composition never depends on the number of processes or on what is already done, so 1 or N
processes and a resumed run give the same bytes (``soar.sampling`` explains why that matters).
Image (i, j) starts from its own noise, seeded ``image_seed(sample.seed, i, j)``.

Resuming: every PNG is written atomically, so a rerun after a kill keeps the complete ones and
samples only the batches that miss an image (writing the missing ones). Before anything is written,
the main process checks each set folder's ``sampling.json`` (model digest, sampler settings, prompts,
dtype): other settings empty the folder, and leftover ``.tmp-*`` files are removed. After every
process is done (a barrier), the main process writes ``index.jsonl`` and the ``metadata.jsonl`` files
and logs to MLflow; the other processes never open a run.

On a GPU the whole bundle runs in bf16; on the CPU in fp32.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm import tqdm

from pipeline.samples import folder_digest, image_path, missing, prepare_set_dir, save_png, write_index
from pipeline.tracking import stage_run
from soar.data.prompts import read_prompt_set
from soar.models.bundle import load_bundle
from soar.sampling import image_seed, sample
from stages.common import declared, load

BASE = "base"
MODELS = (BASE, "sft", "soar")
PARAMS = ("model", "sample", "mlflow")
NEGATIVE_PROMPT = ""  # the paper's negative prompt

log = logging.getLogger("stages.sample")


@dataclass(frozen=True)
class Batch:
    """One forward's worth of entries of one prompt set (fixed by the set and the batch size)."""

    set_name: str
    set_dir: Path
    entries: tuple[dict, ...]


def set_entries(set_dir: Path, path: str, fmt: str, images_per_prompt: int, seed: int) -> list[dict]:
    """Every image of one prompt set in order (prompt index, then image index), as index lines."""
    entries = []
    for item in read_prompt_set(path, fmt):
        for j in range(images_per_prompt):
            entries.append({"prompt_index": item.index, "image_index": j, "prompt": item.prompt,
                            "seed": image_seed(seed, item.index, j), "metadata": item.metadata,
                            "path": str(image_path(set_dir, item.index, j).relative_to(set_dir))})
    return entries


def fixed_batches(set_name: str, set_dir: Path, entries: list[dict], batch_size: int) -> list[Batch]:
    return [Batch(set_name, set_dir, tuple(entries[lo:lo + batch_size])) for lo in range(0, len(entries), batch_size)]


def shard(items: list, rank: int, world: int) -> list:
    """Round-robin share of ``items`` for process ``rank`` of ``world``: disjoint, together all of them."""
    return items[rank::world]


def set_settings(model_digest: str, s, entries: list[dict], dtype: torch.dtype, device: torch.device) -> dict:
    """What the images of one set are a function of; stored as ``sampling.json`` (see module doc)."""
    prompts = hashlib.sha256("".join(f"{e['prompt_index']}\t{e['prompt']}\n" for e in entries).encode())
    return {"model": model_digest, "num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale,
            "resolution": s.resolution, "seed": s.seed, "negative_prompt": NEGATIVE_PROMPT,
            "prompts_sha256": prompts.hexdigest(), "dtype": str(dtype).removeprefix("torch."),
            "device": device.type}


def model_digest(base_path: str | Path, transformer: Path) -> str:
    """The transformer's weights (bytes) and the base folder's file names and sizes (text encoders, codec)."""
    return hashlib.sha256(f"{folder_digest(transformer)}\n{folder_digest(base_path, content=False)}".encode()
                          ).hexdigest()


def main(model: str) -> None:
    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    cfg = load(PARAMS)
    s = cfg.sample
    state = PartialState(cpu=not torch.cuda.is_available())
    cuda = state.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    transformer = Path(cfg.model.base_path) / "transformer" if model == BASE else \
        Path(cfg.model.models_dir) / model / "transformer"

    sets = {}  # name -> (set_dir, entries)
    for set_name, ps in s.prompt_sets.items():
        set_dir = Path(s.out_dir) / model / set_name
        sets[set_name] = set_dir, set_entries(set_dir, ps.path, ps.format, ps.images_per_prompt, s.seed)
    if state.is_main_process:
        digest = model_digest(cfg.model.base_path, transformer)
        for set_dir, entries in sets.values():
            prepare_set_dir(set_dir, set_settings(digest, s, entries, dtype, state.device))
    state.wait_for_everyone()  # nobody writes before the folders are checked

    batches = [b for name, (set_dir, entries) in sets.items() for b in fixed_batches(name, set_dir, entries,
                                                                                      s.batch_size)]
    todo = [b for b in batches if missing(b.set_dir, list(b.entries))]
    mine = shard(todo, state.process_index, state.num_processes)
    total = sum(len(entries) for _, entries in sets.values())
    if state.is_main_process:
        on_disk = total - sum(len(missing(set_dir, entries)) for set_dir, entries in sets.values())
        log.info("sample %s: %d images in %d set(s), %d on disk; %d batch(es) of <= %d to do on %d process(es)",
                 model, total, len(sets), on_disk, len(todo), s.batch_size, state.num_processes)

    with stage_run(cfg.mlflow, "sample", model, declared(cfg, PARAMS), main_process=state.is_main_process) as run:
        tic = time.perf_counter()
        made = torch.tensor([0], device=state.device)  # new PNGs written by this process
        if mine:
            bundle = load_bundle(cfg.model.base_path, transformer_path=None if model == BASE else transformer,
                                 t5_max_length=cfg.model.t5_max_length)
            bundle.to(state.device)
            if cuda:
                bundle.to(dtype)
            for b in tqdm(mine, desc=f"sample {model}", unit="batch", disable=not state.is_main_process):
                entries = list(b.entries)
                images = sample(bundle, [e["prompt"] for e in entries], [e["seed"] for e in entries],
                                steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                resolution=s.resolution, negative_prompt=NEGATIVE_PROMPT)
                for e, im in zip(entries, images, strict=True):
                    if not (b.set_dir / e["path"]).is_file():  # a resumed batch keeps its complete images
                        save_png(b.set_dir / e["path"], im)
                        made += 1
        if state.use_distributed:
            torch.distributed.all_reduce(made)  # also the barrier: every process's images are on disk
        seconds = time.perf_counter() - tic
        if state.is_main_process:
            finish(run, model, sets, log_images=cfg.mlflow.log_images)
            run.log_metrics({"images_sampled": made.item(), "sampling_seconds": seconds,
                             "processes": state.num_processes})
            print(f"sample {model}: {made.item()} new images, {total} in all, {seconds:.1f} s on "
                  f"{state.num_processes} process(es)", flush=True)
    state.wait_for_everyone()
    state.destroy_process_group()


def finish(run, model: str, sets: dict[str, tuple[Path, list[dict]]], log_images: bool) -> None:
    """Main process, after all processes: check every image is there, write the indexes, log to MLflow."""
    for set_name, (set_dir, entries) in sets.items():
        absent = missing(set_dir, entries)
        if absent:
            raise RuntimeError(f"{set_dir}: {len(absent)} image(s) missing after sampling, e.g. {absent[0]['path']}")
        write_index(set_dir, entries)
        run.log_metrics({f"{set_name}/images": len(entries)})
        if log_images:
            run.log_artifact(set_dir / entries[0]["path"], artifact_path=f"samples/{set_name}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
