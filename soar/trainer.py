"""The training loop around ``soar.step.training_step`` (SFT, SOAR and tiny pretraining).

Runs under ``accelerate launch`` (one or many processes); only the main process logs and writes
files, and every process waits for it. The loop: take the captions' text embeddings from a text table
(``soar.text_cache``: the ``embed`` stage's file, or every distinct caption encoded once in memory when
none is given) and move the text encoders off the accelerator, then for each optimiser step draw a
bucketed batch, encode images to latents, run one step, check the loss is finite on every process,
clip, update, update the EMA, log, checkpoint, and every ``validation_steps`` steps sample the fixed
validation prompts on the main process (``soar.validation``) and hand the images to a callback.

State and failures (checkpoint format and atomic writes: ``soar.checkpoint``):

- every ``checkpointing_steps`` steps a full-state checkpoint goes to ``{out_dir}/checkpoints``;
  ``resume_from_checkpoint`` (None | "latest" | a folder) restores it exactly: weights, optimiser,
  LR schedule, RNG states, the step's own generator, the data-sampler position and the EMA;
- every ``snapshot_steps`` steps the weights sampling would use (EMA, LoRA merged) go to
  ``{out_dir}/snapshots/step-{N:06d}/transformer``, weights only, for training-dynamics curves
  (``soar.snapshots``; saving from a CPU copy leaves training untouched, snapshots of a resumed run stay);
- a NaN/inf loss skips that step's update, checkpoints the last good state (weights, generator and
  sampler position before the bad step) and raises ``FloatingPointError`` naming the step and folder;
- an out-of-memory error is re-raised naming the batch-size and aux micro-batch settings;
- with an EMA, ``{out_dir}/transformer`` holds the EMA weights (what sampling loads) and
  ``{out_dir}/transformer_raw`` the trained weights (``transformer_raw_lora``: the trained adapters).

What trains (all weights or LoRA adapters), the optimiser (AdamW or 8-bit AdamW) and the LoRA save
format: ``soar.finetune``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader

from soar import checkpoint
from soar.atomic import atomic_folder
from soar.data.dataset import BucketBatchSampler, ImageCaptionDataset, collate
from soar.ema import EMA
from soar.finetune import LoraConfig, make_optimizer, prepare_trainable, save_model, uses_lora
from soar.flow import sigma_grid
from soar.latent_cache import LatentCache
from soar.models.bundle import SD3Bundle
from soar.progress import Progress
from soar.rollout import SoarConfig
from soar.snapshots import cpu_copy, remove_stale_temporaries, snapshot_folder, write_snapshot
from soar.step import StepSettings, TextCond, training_step
from soar.text_cache import CAPTION_BATCH, TextTable, encode_table
from soar.train_config import TrainConfig
from soar.validation import validation_images
from soar.velocity import transformer_velocity

Logger = Callable[[dict[str, float], int], None]
OnValidation = Callable[[np.ndarray, int], None]  # (images [N, H, W, 3] uint8, step); main process only


@contextmanager
def oom_names_settings(loop: TrainConfig, step: StepSettings) -> Iterator[None]:
    """Re-raise an out-of-memory error with the settings that lower memory use."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError; other backends only say so
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc):
            raise
        raise torch.OutOfMemoryError(
            f"out of memory with train.train_batch_size={loop.train_batch_size} and soar.aux_microbatch="
            f"{step.aux_microbatch} (pretrain.* in the pretrain stage): lower train.train_batch_size (raise "
            "train.gradient_accumulation_steps to keep the effective batch), set soar.aux_microbatch to run "
            "the main + auxiliary points in smaller chunks, or turn on train.gradient_checkpointing. "
            f"Original error: {exc}") from exc


def deepspeed_batch_config(ds: dict, loop: TrainConfig, num_processes: int, source: str = "DeepSpeed config") -> dict:
    """Fill the batch keys of the DeepSpeed config ``ds`` (in place, also returned) from ``train``.

    "auto" values become: micro-batch = train.train_batch_size, accumulation = train.gradient_accumulation_steps,
    clipping = train.max_grad_norm, train_batch_size = their product x ``num_processes``. A number that
    disagrees with ``train`` is an error naming ``source`` (the JSON file) and the key. bf16 / fp16 "auto"
    are accelerate's (train.mixed_precision, filled when the Accelerator is built).
    """
    micro, accumulation = loop.train_batch_size, loop.gradient_accumulation_steps
    wanted = {"train_micro_batch_size_per_gpu": (micro, "train.train_batch_size"),
              "gradient_accumulation_steps": (accumulation, "train.gradient_accumulation_steps"),
              "gradient_clipping": (loop.max_grad_norm, "train.max_grad_norm"),
              "train_batch_size": (micro * accumulation * num_processes,
                                   f"train.train_batch_size x train.gradient_accumulation_steps x {num_processes} "
                                   "processes")}
    for key, (value, origin) in wanted.items():
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif given != value:
            raise ValueError(f'{source}: {key} is {given!r} but {origin} gives {value}; set it to "auto" there '
                             "(the trainer fills it) or make the two agree")
    return ds


def configure_deepspeed(accelerator: Accelerator, loop: TrainConfig, step: StepSettings) -> None:
    """Fill the DeepSpeed config's "auto" values the trainer owns (we do not hand it a DataLoader)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    if step.aux_microbatch is not None:  # ZeRO-2 cannot turn gradient reduction off between chunks
        raise ValueError("soar.aux_microbatch must be null under DeepSpeed: every chunk's backward would "
                         "step the optimizer; use train.gradient_checkpointing or a smaller batch instead")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world != accelerator.num_processes:
        raise RuntimeError(f"accelerate counts {accelerator.num_processes} processes but DeepSpeed's process group "
                           f"has {world}: build the Accelerator with pipeline.training.make_accelerator")
    deepspeed_batch_config(plugin.deepspeed_config, loop, accelerator.num_processes,
                           os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "DeepSpeed config"))


def describe_engine(accelerator: Accelerator, model) -> str:
    """One line naming what ``accelerator.prepare`` made of the model (the main process prints it at the start)."""
    n = accelerator.num_processes
    backend = f" ({torch.distributed.get_backend()})" if torch.distributed.is_initialized() else ""
    line = f"engine: {type(model).__name__} on {accelerator.device.type}{backend}, {n} process{'es' * (n > 1)}"
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return line
    precision = "bf16" if model.bfloat16_enabled() else "fp16" if model.fp16_enabled() else "fp32"
    return (f"{line}, ZeRO stage {model.zero_optimization_stage()}, train_batch_size {model.train_batch_size()} = "
            f"micro-batch {model.train_micro_batch_size_per_gpu()} x accumulation {model.gradient_accumulation_steps()}"
            f" x {model.dp_world_size} processes, gradient_clipping {model.gradient_clipping()}, {precision}")


def sixteen_bit(engine) -> bool:
    """Whether a DeepSpeed ``engine`` keeps 16-bit module weights (bf16 / fp16; the fp32 masters are sharded)."""
    return engine is not None and (engine.bfloat16_enabled() or engine.fp16_enabled())


def full_precision(weights: list, engine) -> list[torch.Tensor]:
    """The trained values of ``weights``: the parameters themselves, or under a 16-bit DeepSpeed engine
    the float32 master weights, each gathered from the processes' shards (collective: every process calls it)."""
    if not sixteen_bit(engine):
        return weights
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p) for p in weights]


def train(bundle: SD3Bundle, records: list, image_dir: str | Path, loop: TrainConfig, soar: SoarConfig | None,
          out_dir: str | Path, accelerator: Accelerator, log: Logger, *, text: TextTable | None = None,
          on_validation: OnValidation | None = None, latents: LatentCache | None = None,
          dataloader_num_workers: int = 0, image_memory_mib: int = 0) -> dict[str, float]:
    """Train ``bundle.transformer`` on ``records`` and save it to ``out_dir`` in diffusers format.

    ``text``: the captions' embeddings (e.g. ``soar.text_cache.load_cache``), holding every training
    caption, "" and the validation prompts; None encodes them here, once. ``on_validation(images, step)``
    receives the validation images on the main process every ``loop.validation_steps`` steps. ``latents``: a
    VAE latent cache; images it lacks are encoded once here (each process a share) before step 1.
    ``soar`` None trains SFT (or pretrains): the same step without rollout or auxiliary points.
    ``image_memory_mib``: decoded training images kept in memory per loader process (``ImageCaptionDataset``).
    """
    step = StepSettings(loop, soar)
    validate = loop.validation_enabled and on_validation is not None
    device = accelerator.device
    if text is None:  # encode on the accelerator, then the encoders leave it
        bundle.to(device)
        prompts = loop.validation_prompts if validate else ()
        text = encode_table(bundle, [*(r.caption for r in records), "", *prompts], batch=CAPTION_BATCH)
    else:
        bundle.transformer.to(device)
        bundle.codec.to(device)
    bundle.offload_text_encoders()
    transformer = bundle.transformer.train()
    trainable = prepare_trainable(transformer, loop, loop.seed)  # all weights, or LoRA adapters on frozen ones
    if loop.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    text.index([r.caption for r in records])  # every caption is there (else a KeyError naming it), before step 1
    uncond = TextCond(*text.lookup([""], device))
    if validate:
        text.index(loop.validation_prompts)
    shift = float(bundle.scheduler.config.shift)  # the scheduler's sigmas: grid and continuous shift(u)
    grid = sigma_grid(bundle.scheduler.config.num_train_timesteps, shift).float().to(device)

    # with a latent cache each image is decoded once, to fill it: nothing is worth keeping
    memory = 0 if latents is not None else image_memory_mib * 2**20
    dataset = ImageCaptionDataset(records, image_dir, memory_bytes=memory)
    if latents is not None:  # fill the latent cache once (each process its share), then read moments only
        todo = latents.missing(records)
        progress = Progress(f"latent cache {latents.dir}", len(todo), unit="image", main=accelerator.is_main_process)
        cached = f"({len(records) - len(todo)} of {len(records)} images cached before)"
        progress.update(0, cached)  # a line before the encoding, one when every process is done
        latents.build(bundle.codec, dataset, todo[accelerator.process_index::accelerator.num_processes], device,
                      loop.train_batch_size)
        accelerator.wait_for_everyone()
        progress.update(len(todo), cached)
        dataset.latents = latents
    sampler = BucketBatchSampler([r.bucket for r in records], loop.train_batch_size, seed=loop.seed,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=dataloader_num_workers)
    optimizer = make_optimizer(trainable, loop.optimizer, loop.learning_rate, loop.adam_weight_decay)
    # accelerate steps a prepared schedule once per process at every optimiser step: count in those steps
    n = accelerator.num_processes
    schedule = get_scheduler(loop.lr_scheduler, optimizer, num_warmup_steps=loop.lr_warmup_steps * n,
                             num_training_steps=loop.max_train_steps * n)
    configure_deepspeed(accelerator, loop, step)
    transformer, optimizer, schedule = accelerator.prepare(transformer, optimizer, schedule)
    engine = transformer if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    accelerator.print(describe_engine(accelerator, transformer))
    velocity = transformer_velocity(transformer, cast_inputs=engine is not None)  # DeepSpeed bf16: 16-bit weights
    weights = [p for p in accelerator.unwrap_model(transformer).parameters() if p.requires_grad]
    ema = EMA(full_precision(weights, engine), loop.ema_decay) if loop.ema_decay is not None else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # saved and restored by save_state / load_state
    gen = torch.Generator(device).manual_seed(loop.seed * 1009 + accelerator.process_index)
    ckpt_root = Path(out_dir) / "checkpoints"

    def backward(loss: torch.Tensor) -> None:  # DeepSpeed: gradients only, the engine steps after the finite check
        if engine is None:
            accelerator.backward(loss)
        else:
            engine.set_gradient_accumulation_boundary(accelerator.sync_gradients)
            engine.backward(loss)

    def reduce_counts(c: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(c, reduction="sum") if accelerator.num_processes > 1 else c

    def finite_everywhere(ok: bool) -> bool:
        if accelerator.num_processes == 1:
            return ok
        return float(accelerator.reduce(torch.tensor([float(not ok)], device=device), reduction="sum")) == 0

    def trainer_state(global_step: int, batches_done: int) -> dict:  # this process's part of a checkpoint
        return {"global_step": global_step, "batches_done": batches_done, "generator": gen.get_state()}

    def save(state: dict) -> Path:  # collective: every process calls it
        return checkpoint.save_checkpoint(accelerator, ckpt_root, state["global_step"], state,
                                          loop.checkpoints_total_limit, ema=ema is not None)

    state = trainer_state(0, 0)
    resume = checkpoint.resolve_resume(loop.resume_from_checkpoint, ckpt_root)
    if resume is not None:
        state = checkpoint.load_checkpoint(accelerator, resume, ema=ema is not None)
        gen.set_state(state["generator"])
        accelerator.print(f"resumed from {resume} at step {state['global_step']}")
    elif loop.resume_from_checkpoint is not None:
        accelerator.print(f"resume_from_checkpoint=latest: no complete checkpoint under {ckpt_root}; starting fresh")

    global_step, done = state["global_step"], state["batches_done"]  # done: batches this process consumed
    if accelerator.is_main_process:
        for folder in remove_stale_temporaries(out_dir):
            accelerator.print(f"removed {folder}, left by a killed snapshot write")
    accelerator.wait_for_everyone()
    if (resume is not None and loop.snapshot_steps and global_step % loop.snapshot_steps == 0
            and not snapshot_folder(out_dir, global_step).is_dir()):  # killed between checkpoint and snapshot
        save_snapshot(accelerator, transformer, Path(out_dir), global_step, ema, weights, loop, engine)
    epoch, start = sampler.locate(done)
    good, finite = state, True  # good: the state before the current step (what a NaN step falls back to)
    where = "on another process"  # named in the error when the non-finite loss was not this process's
    last, tic, seen = {}, time.perf_counter(), 0
    while global_step < loop.max_train_steps:
        sampler.set_epoch(epoch, start_batch=start)
        for batch in loader:
            with oom_names_settings(loop, step):
                cond = TextCond(*text.lookup(batch["captions"], device))
                z0 = (bundle.codec.sample_moments(batch["mean"].to(device), batch["std"].to(device), generator=gen)
                      if "mean" in batch else bundle.codec.encode(batch["pixels"].to(device), generator=gen))
                with accelerator.accumulate(transformer), accelerator.autocast():
                    metrics = training_step(velocity, z0, cond, uncond, grid, step, gen,
                                            backward=backward, reduce_counts=reduce_counts,
                                            world_size=accelerator.num_processes, shift=shift,
                                            no_sync=lambda: accelerator.no_sync(transformer))
                done += 1
                if finite and not bool(torch.isfinite(metrics["loss"])):  # this process's first bad micro-step
                    finite, where = False, f"this process: {metrics['loss'].item()} at its batch {done}"
                grad_norm = None
                if accelerator.sync_gradients:
                    if not finite_everywhere(finite):  # skip the update, keep the last good state
                        optimizer.zero_grad(set_to_none=True)
                        path = save(good)
                        raise FloatingPointError(
                            f"non-finite loss ({where}) at step {global_step + 1}; "
                            f"the state after step {global_step} is saved in {path}")
                    if engine is None:
                        grad_norm = accelerator.clip_grad_norm_(trainable, loop.max_grad_norm)
                    else:  # clips (gradient_clipping = train.max_grad_norm), updates the shards, gathers weights
                        engine.step()
                        grad_norm = engine.get_global_grad_norm()
                optimizer.step()  # these three do nothing between accumulation micro-steps (and under DeepSpeed)
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
            seen += z0.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.update(full_precision(weights, engine))
            good, finite = trainer_state(global_step, done), True
            if global_step % loop.log_every == 0 or global_step == loop.max_train_steps:
                elapsed = time.perf_counter() - tic
                last = {k: float(v) for k, v in metrics.items()}
                last.update(lr=schedule.get_last_lr()[0], images_per_s=seen / elapsed)
                if grad_norm is not None:  # the norm before clipping
                    last["grad_norm"] = float(grad_norm)
                log(last, global_step)
                tic, seen = time.perf_counter(), 0
            if validate and loop.validation_due(global_step) and accelerator.is_main_process:
                with accelerator.autocast():
                    images = validation_images(bundle, accelerator.unwrap_model(transformer), text, loop)
                on_validation(images, global_step)
            if loop.checkpointing_steps and global_step % loop.checkpointing_steps == 0:
                save(good)
            if loop.snapshot_steps and global_step % loop.snapshot_steps == 0:
                save_snapshot(accelerator, transformer, Path(out_dir), global_step, ema, weights, loop, engine)
            if global_step >= loop.max_train_steps:
                break
        epoch, start = epoch + 1, 0
    save_outputs(accelerator, transformer, Path(out_dir), ema, weights, loop, engine)
    return last


def trained_copy(model: torch.nn.Module, weights: list, values: list, upcast: bool) -> torch.nn.Module:
    """A CPU copy of ``model`` whose trainable ``weights`` take ``values`` (the EMA shadow, the fp32 masters or the
    weights themselves); all in float32 when ``upcast`` (the model holds a 16-bit DeepSpeed engine's copies)."""
    if not upcast:
        return cpu_copy(model, {id(p): v for p, v in zip(weights, values, strict=True)})
    copy = cpu_copy(model).float()
    with torch.no_grad():
        for q, v in zip([q for q in copy.parameters() if q.requires_grad], values, strict=True):
            q.copy_(v)
    return copy


def save_snapshot(accelerator: Accelerator, transformer, out_dir: Path, step: int, ema: EMA | None, weights: list,
                  lora: LoraConfig, engine=None) -> None:
    """From the main process: the weights sampling would use at ``step`` (EMA when on, LoRA merged) to
    ``out_dir/snapshots`` (``soar.snapshots``), saved from a CPU copy so training is untouched. Every process
    calls it (a barrier; under a 16-bit DeepSpeed engine every process also gives its shard of the fp32 weights)."""
    values = ema.shadow if ema is not None else full_precision(weights, engine)
    if accelerator.is_main_process:
        model = trained_copy(accelerator.unwrap_model(transformer), weights, values, sixteen_bit(engine))
        folder = write_snapshot(model, out_dir, step, lora)
        accelerator.print(f"snapshot of step {step}: {folder}")
    accelerator.wait_for_everyone()


def save_outputs(accelerator: Accelerator, transformer, out_dir: Path, ema: EMA | None, weights: list,
                 lora: LoraConfig, engine=None) -> None:
    """From the main process: ``out_dir/transformer`` (the EMA weights when on, what sampling loads; with
    LoRA merged, adapters in ``transformer_lora``) and, with an EMA, the trained weights beside it.
    Under a 16-bit DeepSpeed engine both are float32, from the fp32 master weights gathered from every process."""
    accelerator.wait_for_everyone()
    model, trained = accelerator.unwrap_model(transformer), weights
    if sixteen_bit(engine):
        masters = full_precision(weights, engine)  # collective
        if accelerator.is_main_process:
            model = trained_copy(model, weights, masters, upcast=True)
            trained = [p for p in model.parameters() if p.requires_grad]
    if accelerator.is_main_process:
        if ema is not None:
            raw = out_dir / ("transformer_raw_lora" if uses_lora(lora) else "transformer_raw")
            with atomic_folder(raw) as tmp:
                (model.save_lora_adapter if uses_lora(lora) else model.save_pretrained)(tmp)
            ema.copy_to(trained)
        save_model(model, out_dir / "transformer", lora)
    accelerator.wait_for_everyone()
