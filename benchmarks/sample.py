"""Sampling throughput: images/s and peak memory over batch sizes (GPU: SD3.5-Medium shape; CPU: tiny).

    python benchmarks/sample.py                         # GPU: SD3.5-M shape, 512 px, 40 steps, CFG 4.5, bf16
    python benchmarks/sample.py --threads 1             # no GPU: the tiny model of params.yaml model.tiny
    python benchmarks/sample.py --full --model-dir DIR  # the whole sampler of the stage on a local model folder
    python benchmarks/sample.py --help                  # --batches, --steps, --reps, --compile, --sd35, ...

What is timed, by default: the denoising loop of the sample stage, ``soar.euler.denoise`` — ``--steps``
Euler steps, each ONE transformer forward of 2B rows (B prompts' cond rows and B uncond rows, CFG 4.5)
— on random text embeddings of the right shapes. Text encoding and VAE decoding are NOT included
(the output says so). With ``--full`` it times ``soar.euler.sample`` instead, exactly what the stage
calls per batch: prompt encoding (CLIP x2 + T5 when the folder has it), the loop, codec decoding and
the uint8 conversion, with the model folder ``--model-dir`` (a local SD3.5 folder on the GPU; without
it a random-init tiny folder written to a temp directory, CPU only).

On a GPU the model is a random-init ``SD3Transformer2DModel`` of the SD3.5-Medium shape, built by
``benchmarks/train_step.py`` (``gpu_setup``: 24 layers, 24 heads x 64, dual attention in layers 0-12,
joint_attention_dim 4096, pooled 2048, qk rms_norm, patch 2, 16 latent channels), in bf16 weights as
the stage runs it; 512 px = 64x64 latents, 154 text tokens (77 CLIP + 77 T5). On the CPU: the tiny
transformer of ``params.yaml`` ``model.tiny`` (``tiny_setup``), fp32. ``--sd35`` forces the SD3.5-M
shape anywhere (with ``--num-layers``/``--latent`` to shrink it for a CPU smoke run).

Per batch size: ``--warmup`` untimed batches, then the median of ``--reps`` timed ones; images/s =
B / (s/batch); peak GiB = ``torch.cuda.max_memory_allocated`` (GPU); model TFLOP/s and MFU from the
FLOPs ``train_step.count_flops`` counts on the meta device for one forward of 2B rows, times steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step.py beside this file
from train_step import ROOT, Setup, add_run_args, count_flops, gpu_setup, run_device, tiny_setup  # noqa: E402

from soar.euler import denoise, image_seed, initial_noise, sample  # noqa: E402
from soar.models.tiny import NUM_TRAIN_TIMESTEPS  # noqa: E402
from soar.velocity import transformer_velocity, with_cfg  # noqa: E402


def sigmas_for(steps: int, shift: float) -> torch.Tensor:
    """The sample stage's sigmas (``sampling_sigmas``) without a bundle: 1 -> 0, shifted."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double().cpu()


def shrink(setup: Setup, num_layers: int | None) -> Setup:
    if not num_layers:
        return setup
    config = dict(setup.config, num_layers=num_layers)
    if config.get("dual_attention_layers"):
        config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < num_layers)
    return dataclasses.replace(setup, name=f"{setup.name}, {num_layers} layers", config=config)


def tiny_folder(out: Path) -> Path:
    """A random-init tiny model folder (params.yaml model.tiny) for ``--full`` on the CPU."""
    from pipeline.config import read_params
    from soar.models.tiny import TinyModelConfig, write_tiny_model

    write_tiny_model(out, TinyModelConfig(**read_params(ROOT / "params.yaml")["model"]["tiny"]),
                     ["a photo of a red circle", 'a sign that says "CAT"'], seed=0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default GPU 1,2,4,8,16; CPU 1,4,16)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--sd35", action="store_true", help="the SD3.5-M shape even without a GPU")
    ap.add_argument("--num-layers", type=int, default=None, help="shrink the model to this many layers (smoke runs)")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 64 = 512 px; tiny: its size)")
    ap.add_argument("--text-tokens", type=int, default=None, help="text tokens (default 154; tiny: its length)")
    ap.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="weights (default: bf16 GPU, fp32 CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer (warm-up compiles)")
    ap.add_argument("--full", action="store_true", help="time soar.euler.sample: text encoding + decode included")
    ap.add_argument("--model-dir", default=None, help="--full: local model folder (default CPU: a temp tiny one)")
    add_run_args(ap, reps=3, warmup=1)
    args = ap.parse_args()
    device = run_device(args)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    batches = [int(b) for b in (args.batches or ("1,2,4,8,16" if cuda else "1,4,16")).split(",")]
    where = f"{device} ({torch.cuda.get_device_name(device)})" if cuda else \
        f"cpu, torch threads {torch.get_num_threads()}"

    bundle = None
    if args.full:
        if args.model_dir is None and cuda:
            raise SystemExit("--full on a GPU needs --model-dir (a local SD3.5 folder; nothing is downloaded)")
        from soar.models.bundle import load_bundle

        scratch = tempfile.TemporaryDirectory()  # removed when the script ends
        folder = Path(args.model_dir) if args.model_dir else tiny_folder(Path(scratch.name) / "tiny")
        bundle = load_bundle(folder).to(device)
        if dtype != torch.float32:
            bundle.to(dtype)
        model = bundle.transformer
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        pixel = bundle.codec.downscale == 1  # the tiny pixel codec: latent side = image side
        channels, side = bundle.codec.channels, args.latent or (config["sample_size"] if pixel else 64)
        setup = Setup(f"model folder {folder}", config, side, channels, args.text_tokens or 0,
                      bundle.scheduler.config.shift)
    else:
        setup = shrink(gpu_setup(args) if cuda or args.sd35 else tiny_setup(args), args.num_layers)
        torch.manual_seed(0)
        with torch.device(device):
            model = SD3Transformer2DModel(**setup.config)
        model = model.to(dtype).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    if args.compile:
        model = torch.compile(model)
        if bundle is not None:
            bundle.transformer = model
    sigmas = sigmas_for(args.steps, setup.shift)
    width, pooled_dim = setup.config["joint_attention_dim"], setup.config["pooled_projection_dim"]
    codec_scale = bundle.codec.downscale if bundle is not None else (8 if setup.channels == 16 else 1)
    resolution = setup.latent * codec_scale

    print(f"{setup.name}: {n_params / 1e6:,.1f} M params, {str(dtype).removeprefix('torch.')} weights, {where}")
    print(f"{args.steps} steps, CFG {args.guidance} (cond + uncond rows in one forward of 2B rows), {resolution} px = "
          f"{setup.channels}x{setup.latent}x{setup.latent} latents"
          + (f", {setup.text_tokens} text tokens" if not args.full else "")
          + (", torch.compile" if args.compile else ""))
    print("full sampler: prompt encoding + denoising + decoding (soar.euler.sample)" if args.full else
          "transformer only: text encoding and VAE decoding excluded (random text embeddings)")
    print(f"{args.reps} timed batches after {args.warmup} warm-up per batch size")
    scale, unit = (1e12, "TFLOP/s") if cuda else (1e9, "GFLOP/s")
    print(f"{'batch':>5} {'images/s':>9} {'s/batch':>8} {'peak GiB':>9} {unit:>8} {'MFU %':>6}")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for b in batches:
        seeds = [image_seed(0, i, 0) for i in range(b)]
        g = torch.Generator().manual_seed(b)
        if args.full:
            prompts = [f"a photo of a red circle number {i}" for i in range(b)]
            run = functools.partial(sample, bundle, prompts, seeds, steps=args.steps, guidance_scale=args.guidance,
                                    resolution=resolution)
        else:
            z = initial_noise(seeds, (setup.channels, setup.latent, setup.latent)).to(device)
            embeds = torch.randn(2 * b, setup.text_tokens, width, generator=g).to(device, dtype)
            pooled = torch.randn(2 * b, pooled_dim, generator=g).to(device, dtype)
            velocity = with_cfg(transformer_velocity(model, cast_inputs=True), args.guidance, embeds[b:], pooled[b:])
            run = functools.partial(denoise, velocity, z, sigmas, embeds[:b], pooled[:b])
        try:
            times = []
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for rep in range(args.warmup + args.reps):
                sync()
                tic = time.perf_counter()
                run()
                sync()
                if rep >= args.warmup:
                    times.append(time.perf_counter() - tic)
        except torch.OutOfMemoryError:
            print(f"{b:>5} out of memory")
            break
        t = statistics.median(times)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:9.1f}" if cuda else f"{'-':>9}"
        flops = args.steps * count_flops(setup, 2 * b, grad=False) if not args.full else 0
        rate = f"{flops / t / scale:8.2f}" if flops else f"{'-':>8}"
        mfu = f"{100 * flops / t / (args.peak_tflops * 1e12):6.1f}" if flops and cuda else f"{'-':>6}"
        print(f"{b:>5} {b / t:9.3f} {t:8.3f} {peak} {rate} {mfu}", flush=True)
    if not args.full:
        print("(text encoding and VAE decoding excluded; MFU against "
              f"{args.peak_tflops:g} TFLOP/s, the rate of benchmarks/README.md's reference figures)" if cuda else
              "(text encoding and decoding excluded)")


if __name__ == "__main__":
    main()
