"""DeepSpeed ZeRO-2 on the CPU (DS_ACCELERATOR=cpu, gloo): the real engine through accelerate's launcher.

Two processes train the tiny model with pipeline/launch/zero2.yaml and, with the same seeds and global
batch, with pipeline/launch/cpu_multi.yaml (DDP); per-step losses and final weights agree within a float32
tolerance, and a ZeRO-2 checkpoint resumes to the uninterrupted run's weights. The batch keys DeepSpeed
gets are checked by DeepSpeed's own config validation for 1, 2 and 8 processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ACCELERATE_LAUNCH, free_port, write_launch_world
from safetensors.torch import load_file

from pipeline.config import parse_config, read_params
from soar.train_config import TrainConfig
from soar.trainer import deepspeed_batch_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "pipeline" / "launch"
ARCH = dict(sample_size=16, patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=8,
            joint_attention_dim=32, pooled_projection_dim=32, caption_projection_dim=16, qk_norm="rms_norm",
            text_hidden_size=16, text_layers=1, text_max_length=12, shift=3.0)
STEPS, CHECKPOINT_AT, WARMUP, LR = 4, 2, 4, 2e-3
# ZeRO-2 and DDP differ by float32 round-off only: ZeRO-2 reduces every micro-step's gradients and adds the
# reduced shards, DDP adds the micro-steps locally and all-reduces once, so sums round differently (a few
# ulp); AdamW divides the difference out (g / sqrt(v)), so after 4 steps the weights differ by ~1e-8
# (weights ~0.1-1, ulp ~6e-8). 1e-6 leaves a wide margin and is still 100x below what 4 steps move them.
WEIGHT_ATOL = 1e-6
LOSS_RTOL = 1e-5  # losses and gradient norms: measured within one float32 ulp



def has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


needs_deepspeed = pytest.mark.skipif(not has_deepspeed(), reason="needs deepspeed (pip install -e '.[test]')")


# --- the batch keys DeepSpeed validates ----------------------------------------------------------------

class DataParallel:
    """What DeepSpeed's config asks an ``mpu``: the data-parallel world size."""

    def __init__(self, size: int):
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


@needs_deepspeed
@pytest.mark.parametrize(("processes", "accumulation"), [(1, 1), (2, 1), (2, 2), (8, 2)])
def test_batch_keys_pass_deepspeeds_check(processes, accumulation, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime import config
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(config.dist, "get_rank", lambda: 0)  # rank 0 of a group of ``processes`` (no group here)

    plugin = DeepSpeedPlugin(hf_ds_config=str(LAUNCH / "ds_zero2.json"))  # as `accelerate launch` builds it
    loop = TrainConfig(train_batch_size=3, gradient_accumulation_steps=accumulation, max_grad_norm=0.5)
    ds = deepspeed_batch_config(plugin.deepspeed_config, loop, processes)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (3, accumulation, 3 * accumulation * processes, 0.5)
    ds["bf16"]["enabled"] = ds["fp16"]["enabled"] = False  # accelerate fills these from train.mixed_precision
    checked = DeepSpeedConfig(ds, mpu=DataParallel(processes))  # raises on micro x accumulation x world != batch
    assert (checked.train_batch_size, checked.train_micro_batch_size_per_gpu, checked.gradient_accumulation_steps,
            checked.world_size) == (3 * accumulation * processes, 3, accumulation, processes)


def test_a_fixed_batch_key_that_disagrees_is_an_error():
    loop = TrainConfig(train_batch_size=4, gradient_accumulation_steps=1)
    ds = deepspeed_batch_config({"train_batch_size": 8, "gradient_clipping": "auto"}, loop, 2)  # 4 x 1 x 2: agrees
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_clipping"] == loop.max_grad_norm
    with pytest.raises(ValueError, match=r"ds\.json: train_batch_size is 8 but train\.train_batch_size x "
                                         r"train\.gradient_accumulation_steps x 4 processes gives 16"):
        deepspeed_batch_config({"train_batch_size": 8}, loop, 4, "ds.json")


def test_a_deepspeed_launch_that_cannot_run_says_what_to_do(monkeypatch):
    from pipeline import training

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert training.deepspeed_launch() is False
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    if has_deepspeed():
        with pytest.raises(RuntimeError, match="CUDA is not available: set DS_ACCELERATOR=cpu"):
            training.deepspeed_launch()
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
        assert training.deepspeed_launch() is True
    monkeypatch.setattr(training.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"deepspeed is not installed: pip install -e '\.\[deepspeed\]'"):
        training.deepspeed_launch()


# --- 2 processes: ZeRO-2 vs DDP, a ZeRO-2 resume, bf16, a NaN step ---------------------------------------

POISONED = """
import os
import soar.trainer as trainer
from stages.train import main
real, calls = trainer.training_step, []
def poisoned(velocity, z0, *args, **kwargs):  # rank 0's 5th micro-step = step 3's first: NaN latents
    calls.append(1)
    bad = len(calls) == 5 and os.environ["RANK"] == "0"
    return real(velocity, z0 * float("nan") if bad else z0, *args, **kwargs)
trainer.training_step = poisoned
main("soar")
"""


def launch(work: Path, name: str, config: str, program: tuple[str, ...] = ("-m", "stages.train", "soar"),
           **train) -> subprocess.CompletedProcess:
    """accelerate's launcher: 2 processes of ``program`` on the CPU, output under ``work/name``.

    The DeepSpeed JSON is passed as an absolute path: zero2.yaml names it relative to the repository root,
    where the stages run, and this runs in a temporary folder."""
    params = read_params(work / "params.yaml")
    params["model"]["models_dir"] = name
    params["train"].update(train)
    params["mlflow"]["tracking_uri"] = f"sqlite:///{work / name}.db"
    parse_config(params)
    (work / f"{name}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, SOAR_PARAMS=f"{name}.yaml", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", DVC_ROOT=str(work))
    cmd = [*ACCELERATE_LAUNCH, "--config_file", str(LAUNCH / config),
           *(["--deepspeed_config_file", str(LAUNCH / "ds_zero2.json")] if "zero2" in config else []),
           "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
           "--tee", "3", "--log_dir", str(work / f"{name}_logs"), *program]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny world and model; DDP, ZeRO-2 (checkpoints at steps 2 and 4), ZeRO-2 resumed from step 2's
    checkpoint, ZeRO-2 in bf16, and ZeRO-2 with a NaN loss at step 3 on rank 0."""
    if not has_deepspeed():
        pytest.skip("needs deepspeed (pip install -e '.[test]')")
    work = tmp_path_factory.mktemp("deepspeed")
    params = write_launch_world(work, ARCH, ROOT / "params.yaml")
    params["train"].update(max_train_steps=STEPS, train_batch_size=2, gradient_accumulation_steps=2, log_every=1,
                           learning_rate=LR, lr_scheduler="constant_with_warmup", lr_warmup_steps=WARMUP,
                           checkpointing_steps=CHECKPOINT_AT, checkpoints_total_limit=None,
                           snapshot_steps=CHECKPOINT_AT, validation_steps=0, ema_decay=0.5, mixed_precision="no")
    params["mlflow"]["experiment"] = "deepspeed-test"
    parse_config(params)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, SOAR_PARAMS="params.yaml", OMP_NUM_THREADS="1", DVC_ROOT=str(work),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    subprocess.run([sys.executable, "-m", "stages.embed"], cwd=work, env=env, check=True, timeout=300)
    procs = {"ddp": launch(work, "ddp", "cpu_multi.yaml"), "zero2": launch(work, "zero2", "zero2.yaml")}
    if procs["zero2"].returncode == 0:  # the state after step 2, as a run stopped there leaves it
        first = work / "zero2" / "soar" / "checkpoints" / f"checkpoint-{CHECKPOINT_AT}"
        shutil.copytree(first, work / "resumed" / "soar" / "checkpoints" / first.name)
        procs["resumed"] = launch(work, "resumed", "zero2.yaml", resume_from_checkpoint="latest")
    procs["bf16"] = launch(work, "bf16", "zero2.yaml", mixed_precision="bf16")
    (work / "poisoned.py").write_text(POISONED)
    procs["nan"] = launch(work, "nan", "zero2.yaml", (str(work / "poisoned.py"),), checkpointing_steps=0)
    return work, procs


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def metric(work: Path, name: str, key: str) -> dict[int, float]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / name}.db")
    runs = client.search_runs([client.get_experiment_by_name("deepspeed-test").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


def zero_fp32(folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights DeepSpeed's own tool rebuilds from a checkpoint's ZeRO shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="pytorch_model")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def rank_lines(out: str, rank: int, piece: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"[default{rank}]:") and piece in line]


@pytest.mark.slow
@needs_deepspeed
def test_zero2_launch_runs_the_deepspeed_engine(runs):
    work, procs = runs
    out = ok(procs["zero2"])
    assert [line for line in out.splitlines() if "engine: " in line] == [  # from the prepared object, rank 0 only
        "[default0]:engine: DeepSpeedEngine on cpu (gloo), 2 processes, ZeRO stage 2, train_batch_size 8 = "
        "micro-batch 2 x accumulation 2 x 2 processes, gradient_clipping 1.0, fp32"]
    assert [line for line in ok(procs["ddp"]).splitlines() if "engine: " in line] == [
        "[default0]:engine: DistributedDataParallel on cpu (gloo), 2 processes"]
    steps = [line for line in out.splitlines() if "train:soar step " in line]
    assert len(steps) == STEPS and all(line.startswith("[default0]:") for line in steps), steps
    folder = work / "zero2" / "soar" / "checkpoints" / f"checkpoint-{CHECKPOINT_AT}"
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for name in ("COMPLETE", "pytorch_model/mp_rank_00_model_states.pt", "trainer_state_0.pt", "trainer_state_1.pt",
                 "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt", "custom_checkpoint_0.pkl",
                 "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt", "scheduler.bin"):
        assert name in names, (name, sorted(names))  # the engine's own files, one optimizer shard per process
    assert not list(folder.parent.glob(".*"))  # no temporary folder left


@pytest.mark.slow
@needs_deepspeed
def test_zero2_matches_ddp(runs):
    work, procs = runs
    ok(procs["ddp"]), ok(procs["zero2"])
    for key in ("loss", "loss_main", "loss_aux", "grad_norm"):
        ddp, zero2 = metric(work, "ddp", key), metric(work, "zero2", key)
        assert sorted(ddp) == sorted(zero2) == list(range(1, STEPS + 1)), key
        for step in ddp:
            assert zero2[step] == pytest.approx(ddp[step], rel=LOSS_RTOL), (key, step)
    for name in ("ddp", "zero2"):  # warm-up counted in optimiser steps, whatever the number of processes
        lr = metric(work, name, "lr")
        assert all(lr[s] == pytest.approx(LR * min(1, s / WARMUP)) for s in lr), (name, lr)
    base = weights(work / "base" / "transformer")
    report = {}
    for folder in ("transformer", "transformer_raw", f"snapshots/step-{CHECKPOINT_AT:06d}/transformer"):
        a, b = weights(work / "ddp" / "soar" / folder), weights(work / "zero2" / "soar" / folder)
        assert max_abs_diff(a, base) > 100 * WEIGHT_ATOL  # trained: far beyond the tolerance
        report[folder] = max_abs_diff(a, b)
        assert report[folder] < WEIGHT_ATOL, (folder, report[folder])
    print(f"max |ZeRO-2 - DDP| after {STEPS} steps: {report}")
    raw = weights(work / "zero2" / "soar" / "transformer_raw")  # the saved weights are the engine's fp32 weights
    assert max_abs_diff(raw, zero_fp32(work / "zero2" / "soar" / "checkpoints" / f"checkpoint-{STEPS}")) == 0


@pytest.mark.slow
@needs_deepspeed
def test_zero2_checkpoint_resumes_exactly(runs):
    work, procs = runs
    out = ok(procs["resumed"])
    folder = f"resumed/soar/checkpoints/checkpoint-{CHECKPOINT_AT}"
    assert rank_lines(out, 0, f"resumed from {folder} at step {CHECKPOINT_AT}")
    for key in ("loss", "lr"):
        full, resumed = metric(work, "zero2", key), metric(work, "resumed", key)
        assert sorted(resumed) == list(range(CHECKPOINT_AT + 1, STEPS + 1))
        assert all(resumed[s] == full[s] for s in resumed), key  # the same engine, state and data order: exact
    for folder in ("transformer", "transformer_raw", f"snapshots/step-{STEPS:06d}/transformer"):
        diff = max_abs_diff(weights(work / "zero2" / "soar" / folder), weights(work / "resumed" / "soar" / folder))
        assert diff == 0.0, (folder, diff)


@pytest.mark.slow
@needs_deepspeed
def test_zero2_bf16_saves_the_gathered_fp32_weights(runs):
    work, procs = runs
    out = ok(procs["bf16"])
    assert rank_lines(out, 0, "engine: DeepSpeedEngine")[0].endswith(", bf16")
    final = work / "bf16" / "soar" / "checkpoints" / f"checkpoint-{STEPS}"
    module = torch.load(final / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    raw, masters = weights(work / "bf16" / "soar" / "transformer_raw"), zero_fp32(final)
    assert {v.dtype for v in raw.values()} == {torch.float32}
    assert max_abs_diff(raw, masters) == 0  # the fp32 masters gathered from both shards ...
    assert max_abs_diff(raw, module) > 0  # ... not the engine's bf16 module copy
    ema = weights(work / "bf16" / "soar" / "transformer")
    assert {v.dtype for v in ema.values()} == {torch.float32} and 0 < max_abs_diff(ema, raw)
    fp32 = weights(work / "zero2" / "soar" / "transformer_raw")
    assert max_abs_diff(raw, fp32) < 1e-2  # bf16 forward and backward: close to the fp32 run, not equal


@pytest.mark.slow
@needs_deepspeed
def test_zero2_nan_step_stops_every_process_with_the_last_good_state(runs):
    work, procs = runs
    out = procs["nan"].stdout + procs["nan"].stderr
    assert procs["nan"].returncode != 0
    saved = f"the state after step {CHECKPOINT_AT} is saved in nan/soar/checkpoints/checkpoint-{CHECKPOINT_AT}"
    # step 3's first micro-step is rank 0's 5th batch; the error names it even though the second was finite
    assert rank_lines(out, 0, f"non-finite loss (this process: nan at its batch 5) at step 3; {saved}")
    assert rank_lines(out, 1, f"non-finite loss (on another process) at step 3; {saved}")
    folder = work / "nan" / "soar" / "checkpoints" / f"checkpoint-{CHECKPOINT_AT}"
    good = work / "zero2" / "soar" / "checkpoints" / f"checkpoint-{CHECKPOINT_AT}"
    assert max_abs_diff(zero_fp32(folder), zero_fp32(good)) == 0  # the NaN step updated nothing
    state = torch.load(folder / "trainer_state_0.pt", weights_only=True)
    assert (state["global_step"], state["batches_done"]) == (CHECKPOINT_AT, 2 * CHECKPOINT_AT)
    assert not (work / "nan" / "soar" / "transformer").exists()
