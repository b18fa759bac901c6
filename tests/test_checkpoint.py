"""Trainer state: exact resume after a kill, atomic checkpoints, EMA, NaN and out-of-memory behaviour.

The training runs use a one-layer tiny SD3 transformer on 16x16 images (CPU, a second or two each).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import TINY_ARCH, TRAIN_CAPTIONS, train_config, write_tiny_training_world
from safetensors.torch import load_file

import soar.trainer as trainer
from soar import checkpoint
from soar.data.jsonl import TrainingRecord
from soar.ema import EMA
from soar.models.bundle import load_bundle
from soar.models.tiny import TinyModelConfig
from soar.rollout import SoarConfig
from soar.step import StepSettings
from soar.trainer import oom_names_settings, train

TESTS = Path(__file__).resolve().parent
ARCH = TinyModelConfig(**TINY_ARCH)
CAPTIONS = TRAIN_CAPTIONS
RECORDS = [TrainingRecord(md5=f"img{i}", caption=CAPTIONS[i % 4], bw=16, bh=16) for i in range(8)]
LOOP = dict(seed=3, learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=2, adam_weight_decay=1e-2,
            max_grad_norm=1.0, train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=6,
            checkpointing_steps=3, gradient_checkpointing=False, log_every=1, cond_dropout_rate=0.25,
            checkpoints_total_limit=None, resume_from_checkpoint="latest", ema_decay=0.9)
# SOAR with a stochastic second path and per-sample prompt dropout: every kind of draw of the step
SOAR = SoarConfig(num_rollout_paths=2, trajectory_length=2)


def run_train(model_dir: str | Path, image_dir: str | Path, out_dir: str | Path, **overrides) -> dict:
    """Train the tiny model in this process (single-process accelerate on CPU); also used by the subprocess."""
    loop = train_config(**{**LOOP, **overrides})
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=loop.gradient_accumulation_steps)
    return train(load_bundle(model_dir), RECORDS, image_dir, loop, SOAR, out_dir, accelerator, lambda m, s: None)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    model_dir, image_dir, _ = write_tiny_training_world(tmp_path_factory.mktemp("ckpt_world"))
    return model_dir, image_dir


def assert_same(a, b, where: str = "") -> None:
    """Recursive exact equality of nested dicts / lists / tensors."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def load(path: Path):
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=False)


CRASH = """
import os, sys
sys.path.insert(0, {tests!r})
import soar.checkpoint as ck
import test_checkpoint as t
original = ck.save_checkpoint
def save_then_die(accelerator, root, step, *args, **kwargs):
    path = original(accelerator, root, step, *args, **kwargs)
    if step == {k}:
        os._exit(17)  # a hard kill right after the checkpoint: no cleanup, nothing flushed, no final save
    return path
ck.save_checkpoint = save_then_die
t.run_train({model!r}, {images!r}, {out!r}, **{overrides!r})
"""


@pytest.mark.slow
def test_resume_after_kill_equals_straight_run(world, tmp_path, capsys):
    model, images = world
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(model, images, straight)  # 6 steps; "latest" finds nothing and says so
    assert "no complete checkpoint" in capsys.readouterr().out

    code = CRASH.format(tests=str(TESTS), k=3, model=str(model), images=str(images), out=str(killed), overrides={})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert [s for s, _ in checkpoint.complete_checkpoints(killed / "checkpoints")] == [3]
    assert not (killed / "transformer").exists()

    run_train(model, images, killed)  # resumes from checkpoint-3 and runs steps 4..6
    assert "checkpoint-3 at step 3" in capsys.readouterr().out
    a, b = straight / "checkpoints", killed / "checkpoints"
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl",
                 "trainer_state_0.pt"):
        assert_same(load(a / "checkpoint-3" / name), load(b / "checkpoint-3" / name), f"checkpoint-3/{name}")
        assert_same(load(a / "checkpoint-6" / name), load(b / "checkpoint-6" / name), f"checkpoint-6/{name}")
    for folder in ("transformer", "transformer_raw"):  # EMA (sampled) and trained weights
        assert_same(load(straight / folder / "diffusion_pytorch_model.safetensors"),
                    load(killed / folder / "diffusion_pytorch_model.safetensors"), folder)
    optim = load(b / "checkpoint-6" / "optimizer.bin")
    assert all(int(s["step"]) == 6 for s in optim["state"].values())
    state = load(b / "checkpoint-6" / "trainer_state_0.pt")
    assert (state["global_step"], state["batches_done"]) == (6, 12)  # 2 micro-batches per step, 4 per epoch
    base = load(model / "transformer" / "diffusion_pytorch_model.safetensors")
    raw = load(straight / "transformer_raw" / "diffusion_pytorch_model.safetensors")
    ema = load(straight / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], raw[k]) for k in base)  # training moved the weights
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # and the EMA lags behind them


@pytest.mark.slow
def test_a_kill_between_checkpoint_and_snapshot_loses_no_snapshot(world, tmp_path):
    """Step 3's checkpoint is written, the process dies before step 3's snapshot (and a killed snapshot write
    left its hidden folder): the resumed run writes step 3's snapshot from the restored state, removes the
    leftover, and ends with the snapshots of the uninterrupted run, byte for byte."""
    from soar.snapshots import list_snapshots

    model, images = world
    every = {"snapshot_steps": 3, "ema_decay": 0.9}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(model, images, straight, **every)
    code = CRASH.format(tests=str(TESTS), k=3, model=str(model), images=str(images), out=str(killed), overrides=every)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert list_snapshots(killed) == []  # died after checkpoint-3, before its snapshot
    stale = killed / "snapshots" / ".step-000006.tmp"
    (stale / "transformer").mkdir(parents=True)  # what a kill inside a snapshot write leaves

    run_train(model, images, killed, **every)
    assert not stale.exists()
    want, got = list_snapshots(straight), list_snapshots(killed)
    assert [s for s, _ in got] == [s for s, _ in want] == [3, 6]
    for (step, a), (_, b) in zip(want, got, strict=True):
        name = "diffusion_pytorch_model.safetensors"
        assert (a / name).read_bytes() == (b / name).read_bytes(), step


def test_nan_loss_stops_with_step_and_last_good_checkpoint(world, tmp_path, monkeypatch):
    model, images = world
    calls, real_step = [], trainer.training_step

    def poisoned(velocity, z0, *args, **kwargs):
        calls.append(1)
        return real_step(velocity, z0 * float("nan") if len(calls) == 3 else z0, *args, **kwargs)

    monkeypatch.setattr(trainer, "training_step", poisoned)
    bundle = load_bundle(model)
    loop = train_config(**{**LOOP, "gradient_accumulation_steps": 1, "checkpointing_steps": 0, "ema_decay": None,
                           "resume_from_checkpoint": None})
    with pytest.raises(FloatingPointError, match=r"loss \(this process: nan at its batch 3\) at step 3; "
                                             r"the state after step 2 is saved in .*checkpoint-2"):
        train(bundle, RECORDS, images, loop, SOAR, tmp_path, Accelerator(cpu=True), lambda m, s: None)
    folder = tmp_path / "checkpoints" / "checkpoint-2"
    assert checkpoint.is_complete(folder) and not (tmp_path / "transformer").exists()
    saved = load(folder / "model.safetensors")
    live = bundle.transformer.state_dict()
    for key, value in saved.items():  # the bad step was skipped: the weights are those after step 2
        assert torch.isfinite(value).all() and torch.equal(value, live[key]), key
    optim = load(folder / "optimizer.bin")
    assert all(int(s["step"]) == 2 and torch.isfinite(s["exp_avg"]).all() for s in optim["state"].values())
    state = load(checkpoint.trainer_state_file(folder, 0))
    assert (state["global_step"], state["batches_done"]) == (2, 2)  # resuming redoes step 3 on the same batch


def test_out_of_memory_names_the_batch_settings(world, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer, "training_step", oom)
    loop = train_config(**{**LOOP, "resume_from_checkpoint": None})
    with pytest.raises(torch.OutOfMemoryError, match=r"train.train_batch_size=2 and soar.aux_microbatch=None"):
        train(load_bundle(world[0]), RECORDS, world[1], loop, SOAR, tmp_path, Accelerator(cpu=True), print)
    with pytest.raises(torch.OutOfMemoryError, match="soar.aux_microbatch"):  # other backends: a RuntimeError
        with oom_names_settings(loop, StepSettings(loop, SOAR)):
            raise RuntimeError("XPU out of memory")
    with pytest.raises(RuntimeError, match="^unrelated$"):  # other errors pass through unchanged
        with oom_names_settings(loop, StepSettings(loop, SOAR)):
            raise RuntimeError("unrelated")


@pytest.fixture
def small_accelerator():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return accelerator


def test_half_written_checkpoints_are_ignored(small_accelerator, tmp_path, monkeypatch, capsys):
    root = tmp_path / "checkpoints"
    assert checkpoint.resolve_resume("latest", root) is None and checkpoint.resolve_resume(None, root) is None
    first = checkpoint.save_checkpoint(small_accelerator, root, 1, {"global_step": 1}, ema=False)
    assert checkpoint.is_complete(first)

    def crash(*args):
        raise OSError("disk full")

    with monkeypatch.context() as m:  # a crash while writing step 2: only the hidden temp folder is left
        m.setattr(checkpoint, "_write_marker", crash)
        with pytest.raises(OSError, match="disk full"):
            checkpoint.save_checkpoint(small_accelerator, root, 2, {"global_step": 2})
    assert (root / ".checkpoint-2.tmp").is_dir() and not (root / "checkpoint-2").exists()
    (root / "checkpoint-5").mkdir()  # e.g. a partial copy: the name without the marker
    (root / "checkpoint-5" / "model.safetensors").write_bytes(b"")
    assert checkpoint.resolve_resume("latest", root) == first
    with pytest.raises(ValueError, match="checkpoint-5 has no COMPLETE marker"):
        checkpoint.resolve_resume(str(root / "checkpoint-5"), root)
    with pytest.raises(FileNotFoundError, match="checkpoint-9"):
        checkpoint.resolve_resume(str(root / "checkpoint-9"), root)
    with pytest.raises(ValueError, match="ema=False; this run has True"):
        checkpoint.load_checkpoint(small_accelerator, first, ema=True)
    assert checkpoint.load_checkpoint(small_accelerator, first) == {"global_step": 1}
    checkpoint.save_checkpoint(small_accelerator, root, 3, {"global_step": 3})
    assert not (root / ".checkpoint-2.tmp").exists()  # the next save clears leftovers


def test_total_limit_keeps_the_newest(small_accelerator, tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(small_accelerator, tmp_path, step, {"global_step": step}, total_limit=2)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [3, 4]
    checkpoint.save_checkpoint(small_accelerator, tmp_path, 2, {"global_step": 2}, total_limit=2)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [2, 4]  # the new one is never dropped


def test_ema_closed_form():
    x0, values, decay = 2.0, [1.0, -3.0, 0.5, 4.0, 7.25], 0.9
    param = torch.tensor([x0], dtype=torch.float64)
    ema = EMA([param], decay)
    for x in values:
        param.fill_(x)
        ema.update([param])
    n = len(values)
    expected = decay**n * x0 + sum((1 - decay) * decay ** (n - i) * x for i, x in enumerate(values, start=1))
    assert ema.shadow[0].dtype == torch.float64
    assert abs(ema.shadow[0].item() - expected) < 1e-12
    again = EMA([torch.zeros(1, dtype=torch.float64)], decay)
    again.load_state_dict(ema.state_dict())
    target = torch.zeros(1, dtype=torch.float64)
    again.copy_to([target])
    assert target.item() == ema.shadow[0].item() and again.num_updates == n
