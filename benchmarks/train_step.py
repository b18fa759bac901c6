"""Time one full training step (forward, backward, clip, AdamW) for SFT and SOAR: s/step, peak GiB, MFU.

    python benchmarks/train_step.py                      # GPU: SD3.5-Medium shape; CPU: params.yaml model.tiny
    python benchmarks/train_step.py --help               # --batch, --reps, --peak-tflops, --aux-microbatch, ...

On a GPU (the setup of the reference figures in benchmarks/README.md): a randomly initialised
``SD3Transformer2DModel`` of the SD3.5-Medium shape (24 layers, 24 heads x 64, dual attention in
layers 0-12, joint_attention_dim 4096, pooled 2048, qk rms_norm, patch 2, 16 latent channels),
64x64 latents (512 px), batch 4, 154 text tokens (77 CLIP + 77 T5), fp32 weights + bf16 autocast,
gradient checkpointing, AdamW (lr 2e-5, wd 1e-2), grad clipping 1.0. SOAR = ``soar.step.training_step``
with the paper's settings (flow_sde, M = 1, T = 6 aux points, CFG 4.5, logit-normal, lambda 1):
one no-grad CFG rollout forward of 2B rows, then main + aux points in one batched forward/backward.
SFT = the same step with lambda_aux = 0 (main points only, no rollout).

Without CUDA it runs the tiny transformer of ``params.yaml`` ``model.tiny`` on the CPU (fp32,
no checkpointing) with the same step and optimizer, and prints the SOAR/SFT time ratio.

Model FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over the step's model calls, counted on
the meta device (no memory, no time): the rollout forward of 2B rows plus forward + backward of the
B(1 + M·T) training points, i.e. one step's model math WITHOUT the forward that gradient
checkpointing recomputes (MFU counts useful model FLOPs; M = 1 makes the point count exact).
MFU = FLOPs / (seconds per step) / peak. ``--peak-tflops`` defaults to 790 TFLOP/s, the figure
benchmarks/README.md's reference figures use for the H200's dense bf16 rate (NVIDIA's sheet says 989 for H100/H200 SXM).

Seconds per step: median of ``--reps`` after ``--warmup`` untimed steps; SFT and SOAR interleave so
background load hits both alike. Peak GiB: ``torch.cuda.max_memory_allocated`` over the timed steps
of that variant (weights, grads and AdamW states included).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import read_params
from soar.flow import FlowMatchingConfig, sigma_grid
from soar.models.tiny import NUM_TRAIN_TIMESTEPS, TinyModelConfig, build_transformer
from soar.rollout import SoarConfig
from soar.step import StepSettings, TextCond, training_step
from soar.velocity import transformer_velocity

ROOT = Path(__file__).resolve().parents[1]
SD35_MEDIUM = dict(  # the public transformer/config.json of stabilityai/stable-diffusion-3.5-medium
    sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_SHIFT = 3.0


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    config: dict  # SD3Transformer2DModel kwargs
    latent: int  # latent side
    channels: int
    text_tokens: int
    shift: float


def gpu_setup(args) -> Setup:
    return Setup("SD3.5-Medium shape (random init)", SD35_MEDIUM, args.latent or 64, 16, args.text_tokens or 154,
                 SD35_SHIFT)


def tiny_setup(args) -> Setup:
    tiny = TinyModelConfig(**read_params(ROOT / "params.yaml")["model"]["tiny"])
    model = build_transformer(tiny, seed=0)  # the exact tiny constructor, read back as kwargs
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    return Setup("tiny (params.yaml model.tiny)", config, args.latent or tiny.sample_size, config["in_channels"],
                 args.text_tokens or tiny.text_max_length, tiny.shift)


def count_flops(setup: Setup, rows: int, grad: bool) -> int:
    """FLOPs of one model call on ``rows`` points (forward, plus backward when ``grad``), on the meta device."""
    if rows == 0:
        return 0
    with torch.device("meta"):
        model = SD3Transformer2DModel(**setup.config)
        z = torch.randn(rows, setup.channels, setup.latent, setup.latent)
        emb = torch.randn(rows, setup.text_tokens, setup.config["joint_attention_dim"])
        pooled = torch.randn(rows, setup.config["pooled_projection_dim"])
        sigma = torch.rand(rows)
    velocity = transformer_velocity(model)
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(grad):
        out = velocity(z, sigma, emb, pooled)
        if grad:
            out.float().square().mean().backward()
    return counter.get_total_flops()


def step_flops(setup: Setup, s: StepSettings, batch: int) -> int:
    """Model FLOPs of one step: CFG rollout forward (2B rows, SOAR only) + fwd/bwd of the training points."""
    if s.soar.num_rollout_paths != 1 and s.uses_aux:
        raise ValueError("exact FLOP count needs num_rollout_paths = 1 (M > 1 drops paths of samples with t1 = 0)")
    rollout = 2 * batch if s.uses_aux else 0
    points = batch * (1 + s.soar.trajectory_length) if s.uses_aux else batch
    return count_flops(setup, rollout, grad=False) + count_flops(setup, points, grad=True)


def add_run_args(ap: argparse.ArgumentParser, *, reps: int, warmup: int) -> None:
    """Options every benchmark here shares: repetitions, warm-up, MFU peak, CPU threads."""
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="device peak for MFU, TFLOP/s (default 790 as in benchmarks/README.md; H200 sheet: 989)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")


def run_device(args) -> torch.device:
    """Apply ``--threads`` and return ``--device`` (default: cuda when available, else cpu)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model even on a GPU")
    ap.add_argument("--batch", type=int, default=4, help="images per step (default 4, the paper's per-GPU batch)")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 64 = 512 px; tiny: its size)")
    ap.add_argument("--text-tokens", type=int, default=None, help="text tokens (default 154; tiny: its length)")
    ap.add_argument("--trajectory-length", type=int, default=6)
    ap.add_argument("--aux-microbatch", type=int, default=None, help="soar.aux_microbatch (default: one forward)")
    ap.add_argument("--no-checkpointing", action="store_true", help="GPU: turn gradient checkpointing off")
    add_run_args(ap, reps=5, warmup=2)
    args = ap.parse_args()
    device = run_device(args)
    cuda = device.type == "cuda"
    setup = tiny_setup(args) if args.tiny or not cuda else gpu_setup(args)
    checkpointing = cuda and not args.tiny and not args.no_checkpointing
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # the released command's --allow_tf32
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**setup.config).to(device).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=1e-2)
    velocity = transformer_velocity(model)
    grid = sigma_grid(NUM_TRAIN_TIMESTEPS, setup.shift).float().to(device)
    g = torch.Generator(device).manual_seed(0)
    b, width, pooled = args.batch, setup.config["joint_attention_dim"], setup.config["pooled_projection_dim"]
    z0 = torch.randn(b, setup.channels, setup.latent, setup.latent, generator=g, device=device)
    cond = TextCond(torch.randn(b, setup.text_tokens, width, generator=g, device=device),
                    torch.randn(b, pooled, generator=g, device=device))
    uncond = TextCond(torch.randn(1, setup.text_tokens, width, generator=g, device=device),
                      torch.randn(1, pooled, generator=g, device=device))
    flow = FlowMatchingConfig()  # the paper's objective: logit-normal times, condition dropout 0.1
    soar = StepSettings(flow, SoarConfig(trajectory_length=args.trajectory_length, aux_microbatch=args.aux_microbatch))
    variants = {"SFT": StepSettings(flow, None), "SOAR": soar}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step(s: StepSettings, gen: torch.Generator) -> None:
        with autocast:
            training_step(velocity, z0, cond, uncond, grid, s, gen, backward=lambda loss: loss.backward(),
                          shift=setup.shift)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {k: [] for k in variants}
    peak: dict[str, float] = {k: 0.0 for k in variants}
    for rep in range(args.warmup + args.reps):
        for name, s in variants.items():
            gen = torch.Generator(device).manual_seed(100 + rep)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            tic = time.perf_counter()
            step(s, gen)
            sync()
            elapsed = time.perf_counter() - tic
            if rep >= args.warmup:
                times[name].append(elapsed)
                if cuda:
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2**30)

    flops = {name: step_flops(setup, s, b) for name, s in variants.items()}
    scale, unit = (1e12, "TFLOP") if cuda else (1e9, "GFLOP")
    where = f"({torch.cuda.get_device_name(device)})" if cuda else f"torch threads {torch.get_num_threads()}"
    print(f"{setup.name}: {n_params / 1e6:,.1f} M params, device {device} {where}")
    print(f"batch {b}, latents {setup.channels}x{setup.latent}x{setup.latent}, {setup.text_tokens} text tokens, "
          f"{'fp32 weights + bf16 autocast' if cuda else 'fp32'}, gradient checkpointing {checkpointing}, AdamW; "
          f"SOAR: flow_sde, M=1, T={args.trajectory_length}, CFG 4.5, aux_microbatch {args.aux_microbatch}; "
          f"{args.reps} reps after {args.warmup} warm-up")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in variants:
        t = med[name]
        line = (f"{name:>4}: {t:.3f} s/step (median; min {min(times[name]):.3f} max {max(times[name]):.3f}), "
                f"model math {flops[name] / scale:.2f} {unit}/step = {flops[name] / t / scale:.1f} {unit}/s")
        if cuda:
            line += (f", MFU {100 * flops[name] / t / (args.peak_tflops * 1e12):.1f} % of {args.peak_tflops:g}, "
                     f"peak {peak[name]:.1f} GiB")
        print(line)
    if cuda:
        print(f"SOAR floor at {args.peak_tflops:g} TFLOP/s: {flops['SOAR'] / (args.peak_tflops * 1e12):.3f} s/step")
    print(f"SOAR / SFT = {med['SOAR'] / med['SFT']:.2f}x time, {flops['SOAR'] / flops['SFT']:.2f}x model math")


if __name__ == "__main__":
    main()
