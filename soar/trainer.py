"""The training loop around ``soar.step.training_step`` (SFT, SOAR and tiny pretraining).

Runs under ``accelerate launch`` (one or many processes); only the main process logs and saves.
The loop: encode every caption once (in-memory text-embedding cache), then for each optimiser
step draw a bucketed batch, encode images to latents, run one step, clip, update, log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader

from soar.data.dataset import BucketBatchSampler, ImageCaptionDataset, collate
from soar.flow import TIMESTEP_SCALE, sigma_grid
from soar.models.bundle import SD3Bundle
from soar.step import StepSettings, TextCond, training_step

Logger = Callable[[dict[str, float], int], None]
CAPTION_BATCH = 256  # captions per text-encoder call when filling the cache


@dataclass(frozen=True)
class LoopSettings:
    """Optimiser and loop settings (fields as in ``pipeline.config.TrainConfig``)."""

    seed: int
    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    adam_weight_decay: float
    max_grad_norm: float
    train_batch_size: int
    gradient_accumulation_steps: int
    max_train_steps: int
    checkpointing_steps: int
    gradient_checkpointing: bool
    dataloader_num_workers: int
    log_every: int


def encode_captions(bundle: SD3Bundle, captions: Sequence[str]) -> tuple[dict[str, int], TextCond]:
    """Encode each distinct caption once: ``(caption -> row, TextCond [U, L, D] / [U, P])``."""
    unique = sorted(set(captions))
    embeds, pooled = [], []
    for lo in range(0, len(unique), CAPTION_BATCH):
        e, p = bundle.encode_prompts(unique[lo:lo + CAPTION_BATCH])
        embeds.append(e)
        pooled.append(p)
    return {c: i for i, c in enumerate(unique)}, TextCond(torch.cat(embeds), torch.cat(pooled))


def make_velocity(transformer) -> Callable:
    """The model as ``velocity(z, sigma, embeds, pooled)``; timestep = sigma * 1000 for every point."""

    def velocity(z, sigma, embeds, pooled):
        return transformer(hidden_states=z, timestep=sigma * TIMESTEP_SCALE, encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]

    return velocity


def train(bundle: SD3Bundle, records: list, image_dir: str | Path, loop: LoopSettings, step: StepSettings,
          out_dir: str | Path, accelerator: Accelerator, log: Logger) -> dict[str, float]:
    """Train ``bundle.transformer`` on ``records`` and save it to ``out_dir`` in diffusers format."""
    device = accelerator.device
    bundle.to(device)
    transformer = bundle.transformer.train().requires_grad_(True)
    if loop.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    row_of, text = encode_captions(bundle, [r.caption for r in records])
    uncond = TextCond(*bundle.encode_prompts([""]))
    shift = float(bundle.scheduler.config.shift)  # the scheduler's sigmas: grid and continuous shift(u)
    grid = sigma_grid(bundle.scheduler.config.num_train_timesteps, shift).float().to(device)

    dataset = ImageCaptionDataset(records, image_dir)
    sampler = BucketBatchSampler([r.bucket for r in records], loop.train_batch_size, seed=loop.seed,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=loop.dataloader_num_workers)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=loop.learning_rate, weight_decay=loop.adam_weight_decay)
    schedule = get_scheduler(loop.lr_scheduler, optimizer, num_warmup_steps=loop.lr_warmup_steps,
                             num_training_steps=loop.max_train_steps)
    transformer, optimizer, schedule = accelerator.prepare(transformer, optimizer, schedule)
    velocity = make_velocity(transformer)
    gen = torch.Generator(device).manual_seed(loop.seed * 1009 + accelerator.process_index)

    def reduce_counts(c: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(c, reduction="sum") if accelerator.num_processes > 1 else c

    global_step, epoch, last, tic, seen = 0, 0, {}, time.perf_counter(), 0
    while global_step < loop.max_train_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            rows = torch.tensor([row_of[c] for c in batch["captions"]], device=device)
            z0 = bundle.codec.encode(batch["pixels"].to(device), generator=gen)
            with accelerator.accumulate(transformer), accelerator.autocast():
                metrics = training_step(velocity, z0, text.take(rows), uncond, grid, step, gen,
                                        backward=accelerator.backward, reduce_counts=reduce_counts,
                                        world_size=accelerator.num_processes, shift=shift,
                                        no_sync=lambda: accelerator.no_sync(transformer))
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(transformer.parameters(), loop.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
            seen += z0.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if not torch.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss {metrics['loss'].item()} at step {global_step}")
            if global_step % loop.log_every == 0 or global_step == loop.max_train_steps:
                elapsed = time.perf_counter() - tic
                last = {k: float(v) for k, v in metrics.items()}
                last.update(lr=schedule.get_last_lr()[0], grad_norm=float(grad_norm), images_per_s=seen / elapsed)
                log(last, global_step)
                tic, seen = time.perf_counter(), 0
            if loop.checkpointing_steps and global_step % loop.checkpointing_steps == 0 \
                    and global_step < loop.max_train_steps:
                save_transformer(accelerator, transformer, Path(out_dir) / f"checkpoint-{global_step}")
            if global_step >= loop.max_train_steps:
                break
        epoch += 1
    save_transformer(accelerator, transformer, Path(out_dir) / "transformer")
    return last


def save_transformer(accelerator: Accelerator, transformer, folder: Path) -> None:
    """Save the (unwrapped) transformer in diffusers format from the main process."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(transformer).save_pretrained(folder)
    accelerator.wait_for_everyone()
