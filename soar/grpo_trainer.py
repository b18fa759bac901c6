"""The Flow-GRPO loop (``soar.grpo_config`` says what one iteration is) around ``soar.grpo_step``.

Runs under ``accelerate launch`` (one or many processes). Every random draw is a function of
(``seed``, iteration, image): iteration i's prompts come from a generator seeded by (seed, i), image g's
initial noise and step noises from ``image_seed(seed, i, g)``, and the split of the iteration's images into
updates from (seed, i) too. So the images, rewards and advantages do not depend on the number of processes,
and a resumed run continues bit for bit from a checkpoint (written between iterations: the weights, optimiser,
LR schedule, EMA and the step count are the whole state).

One iteration, on every process:

1. draw the prompts; lay out the images (group-major: image g belongs to prompt g // k) and shuffle them into
   ``updates_per_iteration`` equal shares; this process takes every ``world``-th image of each share;
2. sample its images with the SDE sampler under the current weights (no gradient), recording log-probabilities;
3. score them (``reward``), gather every process's rewards and compute the group-relative advantages;
4. for each share: accumulate the loss over its images (in ``train_batch_size`` chunks) and the first
   ``train_steps`` sampler steps, normalised so the gradient is the mean over the share's transitions on any
   number of processes; clip, step, EMA, log, snapshot; checkpoint at the iteration's end.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from soar import checkpoint
from soar.ema import EMA
from soar.euler import image_seed, sampling_sigmas, to_uint8
from soar.finetune import make_optimizer, prepare_trainable, uses_lora
from soar.grpo import group_advantages
from soar.grpo_config import GrpoConfig
from soar.grpo_step import GrpoStepSettings, grpo_loss, sde_trajectories
from soar.models.bundle import SD3Bundle
from soar.text_cache import CAPTION_BATCH, encode_table
from soar.trainer import Logger, OnValidation, save_outputs, save_snapshot
from soar.validation import validation_images
from soar.velocity import Velocity, transformer_velocity, with_cfg

# (uint8 images [N, H, W, 3], prompts, metadata) -> rewards [N] (float64)
RewardFn = Callable[[np.ndarray, Sequence[str], Sequence[dict]], np.ndarray]


def iteration_plan(g: GrpoConfig, n_prompts: int, iteration: int, rank: int, world: int
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Iteration ``iteration``'s prompt indices ``[P]`` (into the prompt file) and, per update, the global image
    indices this process trains (image g shows prompt ``prompts[g // num_image_per_prompt]``)."""
    rng = np.random.default_rng([g.seed, iteration])
    prompts = rng.choice(n_prompts, size=g.prompts_per_iteration, replace=g.prompts_per_iteration > n_prompts)
    order = rng.permutation(g.images_per_iteration)
    shares = order.reshape(g.updates_per_iteration, -1)
    return prompts, [share[rank::world] for share in shares]


def image_noise(seed: int, iteration: int, images: Sequence[int], shape: tuple[int, ...], steps: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``z1 [N, *shape]`` and the step noises ``eps [N, steps, *shape]`` of global images ``images``, each drawn
    from its own CPU generator seeded by ``image_seed(seed, iteration, g)``."""
    z1, eps = [], []
    for g in images:
        gen = torch.Generator().manual_seed(image_seed(seed, iteration, int(g)))
        z1.append(torch.randn(shape, generator=gen))
        eps.append(torch.randn((steps, *shape), generator=gen))
    return torch.stack(z1), torch.stack(eps)


def reference_velocity(model, lora: bool) -> Velocity:
    """The starting model's velocity for the KL term: the same model with its LoRA adapters switched off, or a
    frozen copy of the full weights (taken before any update)."""
    if not lora:
        return transformer_velocity(copy.deepcopy(model).requires_grad_(False).eval())
    base = transformer_velocity(model)

    def velocity(*args: torch.Tensor) -> torch.Tensor:
        model.disable_adapters()
        try:
            return base(*args)
        finally:
            model.enable_adapters()

    return velocity


def train_grpo(bundle: SD3Bundle, prompts: Sequence[str], metadata: Sequence[dict], reward: RewardFn,
               g: GrpoConfig, out_dir: str | Path, accelerator: Accelerator, log: Logger, *,
               on_validation: OnValidation | None = None) -> dict[str, float]:
    """Train ``bundle.transformer`` by Flow-GRPO on ``prompts`` (with their scorer ``metadata``) and save it to
    ``out_dir`` like ``soar.trainer.train`` (``transformer/`` = EMA weights when on, snapshots, checkpoints)."""
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    share = g.images_per_iteration // g.updates_per_iteration
    if share % world:
        raise ValueError(f"grpo: each update's {share} images (prompts_per_iteration x num_image_per_prompt / "
                         f"updates_per_iteration) do not split evenly over {world} processes")
    validate = g.validation_enabled and on_validation is not None
    bundle.to(device)
    text = encode_table(bundle, [*prompts, "", *(g.validation_prompts if validate else ())], batch=CAPTION_BATCH)
    bundle.offload_text_encoders()
    neg = text.lookup([""], device)
    transformer = bundle.transformer.train()
    lora = uses_lora(g)
    trainable = prepare_trainable(transformer, g, g.seed)
    reference = with_cfg(reference_velocity(transformer, lora), g.guidance_scale, *neg) if g.beta > 0 else None
    if g.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = make_optimizer(trainable, g.optimizer, g.learning_rate, g.adam_weight_decay)
    schedule = get_scheduler(g.lr_scheduler, optimizer, num_warmup_steps=g.lr_warmup_steps * world,
                             num_training_steps=g.max_train_steps * world)
    transformer, optimizer, schedule = accelerator.prepare(transformer, optimizer, schedule)
    model = accelerator.unwrap_model(transformer)
    weights = [p for p in model.parameters() if p.requires_grad]
    ema = EMA(weights, g.ema_decay) if g.ema_decay is not None else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    velocity = with_cfg(transformer_velocity(transformer), g.guidance_scale, *neg)
    sampler = with_cfg(transformer_velocity(model, cast_inputs=True), g.guidance_scale, *neg)
    sigmas = sampling_sigmas(bundle, g.num_steps)
    settings = GrpoStepSettings(g.noise_level, float(sigmas[1]), g.clip_range, g.adv_clip_max, g.beta)
    shape = (bundle.codec.channels, *(2 * [g.resolution // bundle.codec.downscale]))

    ckpt_root, global_step = Path(out_dir) / "checkpoints", 0
    resume = checkpoint.resolve_resume(g.resume_from_checkpoint, ckpt_root)
    if resume is not None:
        global_step = checkpoint.load_checkpoint(accelerator, resume, ema=ema is not None)["global_step"]
        accelerator.print(f"resumed from {resume} at step {global_step}")
    last: dict[str, float] = {}
    while global_step < g.max_train_steps:
        iteration = global_step // g.updates_per_iteration
        tic = time.perf_counter()
        chosen, shares = iteration_plan(g, len(prompts), iteration, rank, world)
        mine = np.concatenate(shares)  # this process's images, update by update
        own = chosen[mine // g.num_image_per_prompt]  # the prompt (index into ``prompts``) of each of them
        # 2. sample this process's images under the current weights, recording every step's log-probability
        z1, eps = image_noise(g.seed, iteration, mine, shape, g.num_steps)
        latents, old_log_probs, rewards = [], [], []
        model.eval()
        for lo in range(0, len(mine), g.sample_batch_size):
            batch = own[lo:lo + g.sample_batch_size]
            names = [prompts[p] for p in batch]
            embeds, pooled = text.lookup(names, device)
            with accelerator.autocast():
                traj = sde_trajectories(sampler, z1[lo:lo + len(batch)].to(device), sigmas, embeds, pooled,
                                        g.noise_level, eps[lo:lo + len(batch)])
            latents.append(traj.latents)
            old_log_probs.append(traj.log_probs)
            with torch.no_grad():
                images = to_uint8(bundle.codec.decode(traj.latents[:, -1]))
            rewards.append(reward(images, names, [metadata[p] for p in batch]))
        model.train()
        latents, old_log_probs = torch.cat(latents), torch.cat(old_log_probs)
        # 3. every process's rewards, by global image index -> group-relative advantages
        local = torch.as_tensor(np.concatenate(rewards), dtype=torch.float64, device=device)
        index = torch.as_tensor(mine, device=device)
        all_rewards = torch.empty(g.images_per_iteration, dtype=torch.float64, device=device)
        all_rewards[accelerator.gather(index)] = accelerator.gather(local)
        groups = torch.arange(g.images_per_iteration, device=device) // g.num_image_per_prompt
        advantages = group_advantages(all_rewards, groups, g.global_std)[index]
        by_group = all_rewards.view(-1, g.num_image_per_prompt)
        sampled = {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
                   "zero_std_ratio": float((by_group.std(1, unbiased=False) == 0).double().mean()),
                   "sampling_s": time.perf_counter() - tic}
        # 4. one optimiser step per share, the loss accumulated over its chunks and trained sampler steps
        offset = 0
        for share_images in shares:
            rows = torch.arange(offset, offset + len(share_images))
            offset += len(share_images)
            chunks = [rows[lo:lo + g.train_batch_size] for lo in range(0, len(rows), g.train_batch_size)]
            stats: dict[str, list[torch.Tensor]] = {}
            for c, chunk in enumerate(chunks):
                embeds, pooled = text.lookup([prompts[p] for p in own[chunk.numpy()]], device)
                for j in range(g.train_steps):
                    final = c == len(chunks) - 1 and j == g.train_steps - 1
                    sigma0, sigma1 = (torch.full((len(chunk),), float(s), device=device) for s in sigmas[j:j + 2])
                    with nullcontext() if final else accelerator.no_sync(transformer), accelerator.autocast():
                        loss, step_stats = grpo_loss(velocity, reference, latents[chunk, j], latents[chunk, j + 1],
                                                     old_log_probs[chunk, j], advantages[chunk], sigma0, sigma1,
                                                     embeds, pooled, settings)
                        accelerator.backward(loss * len(chunk) / (len(rows) * g.train_steps))
                    for k, v in step_stats.items():
                        stats.setdefault(k, []).append(v)
            grad_norm = accelerator.clip_grad_norm_(trainable, g.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if ema is not None:
                ema.update(weights)
            if global_step % g.log_every == 0 or global_step == g.max_train_steps:
                means = {k: torch.stack(v).mean() for k, v in stats.items()}  # this process's; then over all
                means = accelerator.reduce(means, reduction="mean") if world > 1 else means
                last = {**sampled, **{k: float(v) for k, v in means.items()}, "grad_norm": float(grad_norm),
                        "lr": schedule.get_last_lr()[0]}
                log(last, global_step)
            if validate and g.validation_due(global_step) and accelerator.is_main_process:
                on_validation(validation_images(bundle, model, text, g), global_step)
            if g.snapshot_steps and global_step % g.snapshot_steps == 0:
                save_snapshot(accelerator, transformer, Path(out_dir), global_step, ema, weights, g)
        if g.checkpointing_steps and global_step % g.checkpointing_steps == 0:
            checkpoint.save_checkpoint(accelerator, ckpt_root, global_step, {"global_step": global_step},
                                       g.checkpoints_total_limit, ema=ema is not None)
    save_outputs(accelerator, transformer, Path(out_dir), ema, weights, g)
    return last
