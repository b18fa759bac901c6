"""Flow-GRPO's loop: SDE trajectories, the iteration plan, 1 vs 2 gloo processes, bit-exact resume, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_ARCH, free_port
from safetensors.torch import load_file

from soar.grpo_config import GrpoConfig
from soar.grpo_step import sde_trajectories
from soar.grpo_trainer import iteration_plan
from soar.rollout import flow_sde_mean_std
from soar.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "grpo_worker.py"


def test_sde_trajectories_follow_the_step_and_record_its_gaussian_density(float64_default):
    """Each recorded z' is mean + std sqrt(-dt) eps of the flow_sde step, and its log-probability is the Gaussian
    density of z' averaged over dimensions (torch.distributions.Normal, float64)."""
    gen = torch.Generator().manual_seed(0)
    z1, eps = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 4, 2, 4, 4, generator=gen)
    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.15, 0.0])
    embeds, pooled = torch.randn(3, 5, 6, generator=gen), torch.randn(3, 6, generator=gen)

    def velocity(z, sigma, e, p):  # an analytic field depending on the state, sigma and the prompt
        return 0.5 * z - sigma.view(-1, 1, 1, 1) * p[:, :2].reshape(-1, 2, 1, 1)

    traj = sde_trajectories(velocity, z1, sigmas, embeds, pooled, 0.7, eps)
    assert traj.latents.shape == (3, 5, 2, 4, 4) and traj.log_probs.shape == (3, 4)
    assert torch.equal(traj.latents[:, 0], z1)
    for i in range(4):
        z = traj.latents[:, i]
        s0, s1 = torch.full((3,), float(sigmas[i])), torch.full((3,), float(sigmas[i + 1]))
        mean, std, dt = flow_sde_mean_std(z, velocity(z, s0, embeds, pooled), s0, s1, 0.7, float(sigmas[1]))
        scale = std * torch.sqrt(-dt)
        torch.testing.assert_close(traj.latents[:, i + 1], mean + scale * eps[:, i], rtol=0, atol=1e-12)
        density = torch.distributions.Normal(mean, scale.expand_as(mean)).log_prob(traj.latents[:, i + 1])
        torch.testing.assert_close(traj.log_probs[:, i], density.flatten(1).mean(1), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="eps"):
        sde_trajectories(velocity, z1, sigmas, embeds, pooled, 0.7, eps[:, :3])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_iteration_plan_splits_every_image_once_into_equal_shares(world):
    g = GrpoConfig(prompts_per_iteration=4, num_image_per_prompt=4, updates_per_iteration=2, seed=5)
    plans = [iteration_plan(g, 10, 3, rank, world) for rank in range(world)]
    prompts = plans[0][0]
    assert len(prompts) == 4 and len(set(prompts.tolist())) == 4  # distinct prompts (10 to draw from)
    assert all(np.array_equal(p, prompts) for p, _ in plans)  # every process draws the same prompts
    for u in range(2):  # each update: an equal share of the 16 images, split evenly over the processes
        shares = [shares[u] for _, shares in plans]
        assert all(len(s) == 8 // world for s in shares)
    everything = np.concatenate([s for _, shares in plans for s in shares])
    assert sorted(everything.tolist()) == list(range(16))
    other = iteration_plan(g, 10, 4, 0, 1)  # another iteration draws anew
    assert not (np.array_equal(other[0], prompts) and np.array_equal(other[1][0], plans[0][1][0]))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("noise_level", 0.0, "noise_level: must be > 0"),
    ("num_image_per_prompt", 1, "num_image_per_prompt: must be >= 2"),
    ("timestep_fraction", 0.05, "timestep_fraction"),
    ("max_train_steps", 3, "max_train_steps: must be a multiple of updates_per_iteration"),
    ("reward", {"geneval": 0.0}, "reward: must name at least one scorer"),
])
def test_config_refuses_what_grpo_cannot_run(key, value, message):
    with pytest.raises(ConfigError, match=message):
        GrpoConfig(**{key: value})


def run_worker(model, out, steps, nproc=1, resume=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = [str(model), str(out), str(steps), *([resume] if resume else [])]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), str(WORKER), *args] if nproc > 1 else [sys.executable, str(WORKER), *args])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((Path(out) / "log.json").read_text())


def weights(folder):
    return load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    """A tiny model; 4 GRPO steps on 1 process, on 2 gloo processes, and 2 steps then a resume to 4."""
    sys.path.insert(0, str(ROOT / "tests"))
    import grpo_worker
    from helpers import TRAIN_CAPTIONS

    from soar.models.tiny import TinyModelConfig, write_tiny_model

    work = tmp_path_factory.mktemp("grpo")
    write_tiny_model(work / "model", TinyModelConfig(**TINY_ARCH), grpo_worker.PROMPTS + TRAIN_CAPTIONS, seed=0)
    logs = {"one": run_worker(work / "model", work / "one", 4), "two": run_worker(work / "model", work / "two", 4, 2)}
    run_worker(work / "model", work / "resumed", 2)
    logs["resumed"] = run_worker(work / "model", work / "resumed", 4, resume="latest")
    return work, logs


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_gradient(grpo_runs):
    work, logs = grpo_runs
    one, two = logs["one"], logs["two"]
    assert sorted(one) == sorted(two) == ["1", "2", "3", "4"]
    for step in one:  # the same images and rewards, the same gradient (norm before clipping), the same losses
        assert one[step]["reward_mean"] == pytest.approx(two[step]["reward_mean"], rel=1e-6)
        assert one[step]["grad_norm"] == pytest.approx(two[step]["grad_norm"], rel=1e-5)
        assert one[step]["policy_loss"] == pytest.approx(two[step]["policy_loss"], rel=1e-4, abs=1e-6)
    assert one["1"]["grad_norm"] > 1e-3  # the brightness reward moves the model: not a zero gradient compared
    for sub in ("transformer_raw", "transformer"):
        a, b = weights(work / "one" / sub), weights(work / "two" / sub)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
def test_policy_equals_reference_at_the_start_then_moves(grpo_runs):
    _, logs = grpo_runs
    one = logs["one"]
    assert one["1"]["kl"] == 0.0 and one["1"]["approx_kl"] < 1e-10  # on-policy, at the starting weights
    assert one["2"]["kl"] > 0 and one["2"]["clipfrac"] > 0  # after an update: KL and clipped ratios
    start = weights(Path(grpo_runs[0]) / "model" / "transformer")
    trained = weights(Path(grpo_runs[0]) / "one" / "transformer_raw")
    assert max((start[k] - trained[k]).abs().max().item() for k in start) > 1e-4


@pytest.mark.slow
def test_a_resumed_grpo_run_continues_bit_for_bit(grpo_runs):
    work, logs = grpo_runs
    assert sorted(logs["resumed"]) == ["3", "4"]
    for step in ("3", "4"):
        assert logs["resumed"][step] == {**logs["one"][step], "sampling_s": logs["resumed"][step]["sampling_s"]}
    for sub in ("transformer_raw", "transformer"):  # trained weights and EMA
        a, b = weights(work / "one" / sub), weights(work / "resumed" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a)


def write_stage_world(work: Path, **grpo) -> dict:
    """A tiny world, model and GRPO prompts under ``work``; the repository's params pointed at them."""
    import yaml
    from helpers import write_launch_world

    from soar.data.tiny_world import generate_world

    params = write_launch_world(work, TINY_ARCH, ROOT / "params.yaml")
    generate_world(work / "gw", num_images=1, image_size=16, num_eval_geneval=0, num_eval_ocr=0,
                   num_grpo_prompts=24, seed=0)
    params["model"]["models_dir"] = "models"
    params["grpo"].update(prompts="gw/grpo/metadata.jsonl", prompts_per_iteration=2, num_image_per_prompt=4,
                          max_train_steps=4, resolution=16, sample_batch_size=8, train_batch_size=4, log_every=1,
                          validation_steps=2, validation_resolution=16, validation_num_inference_steps=2,
                          snapshot_steps=2, ema_decay=0.9, **grpo)
    params["mlflow"].update(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment="grpo-test")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run_stage(work: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SOAR_PARAMS="params.yaml", OMP_NUM_THREADS="1", DVC_ROOT=str(work),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "stages.train", "grpo"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_the_train_grpo_stage_rewards_with_the_registry_and_logs_to_mlflow(tmp_path):
    import mlflow

    write_stage_world(tmp_path)
    proc = run_stage(tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = tmp_path / "models" / "grpo"
    assert (out / "transformer").is_dir() and (out / "transformer_raw").is_dir()  # EMA weights and trained ones
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-000002", "step-000004"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("grpo-test").experiment_id])
    assert run.info.run_name == "train:grpo" and run.data.params["grpo.reward.geneval"] == "1.0"
    history = client.get_metric_history(run.info.run_id, "reward_mean")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert all(0.0 <= m.value <= 1.0 for m in history)  # GenEval: a fraction of correct images
    assert {"grad_norm", "kl", "clipfrac", "zero_std_ratio"} <= set(run.data.metrics)
    for step in (2, 4):  # the validation grids go to the run's artifacts
        assert f"train:grpo validation at step {step}: 2 images -> validation/step_00000{step}.png" in proc.stdout


@pytest.mark.slow
def test_train_grpo_names_an_unknown_scorer_and_a_missing_start_in_one_line(tmp_path):
    write_stage_world(tmp_path, reward={"no_such_scorer": 1.0})
    proc = run_stage(tmp_path)
    assert proc.returncode == 1
    assert "error: train@grpo: params.yaml grpo.reward: unknown scorer 'no_such_scorer'" in proc.stderr
    assert "Traceback" not in proc.stderr
    write_stage_world(tmp_path / "sft", init_from="sft")
    proc = run_stage(tmp_path / "sft")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "grpo.init_from is 'sft' but models/sft/transformer does not exist" in proc.stderr
