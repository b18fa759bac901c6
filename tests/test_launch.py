"""Launch configs and a 2-process (gloo, CPU) training run through `accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import free_port, write_launch_world
from safetensors.torch import load_file

from pipeline.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "pipeline" / "launch"
ARCH = dict(sample_size=16, patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=8,
            joint_attention_dim=32, pooled_projection_dim=32, caption_projection_dim=16, qk_norm="rms_norm",
            text_hidden_size=16, text_layers=1, text_max_length=12, shift=3.0)



# --- 2-process CPU run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A tiny world + tiny model in tmp, a shrunk params file, `accelerate launch` with 2 gloo processes."""
    work = tmp_path_factory.mktemp("launch")
    params = write_launch_world(work, ARCH, ROOT / "params.yaml")
    params["model"]["models_dir"] = "models"
    params["train"].update(max_train_steps=3, train_batch_size=2, log_every=1, checkpointing_steps=0,
                           validation_steps=2, validation_num_inference_steps=2,
                           validation_resolution=ARCH["sample_size"])
    params["mlflow"].update(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment="launch-test")
    params["launch"].update(num_processes=2, config_file=str(LAUNCH / "cpu_multi.yaml"))
    parse_config(params)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, SOAR_PARAMS="params.yaml", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", DVC_ROOT=str(work))
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", params["launch"]["config_file"],
           "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
           "--tee", "3", "--log_dir", str(work / "logs"), "-m", "stages.train", "soar"]
    subprocess.run([sys.executable, "-m", "stages.embed"], cwd=work, env=env, check=True, timeout=300)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    return work, proc


@pytest.mark.slow
def test_two_gloo_processes_train_and_only_rank0_logs(two_process_run, monkeypatch):
    work, proc = two_process_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    ranks = {p.name for p in work.glob("logs/*/attempt_0/*") if p.is_dir()}
    assert ranks == {"0", "1"}, ranks  # torchrun started two local workers
    steps = [line for line in out.splitlines() if "train:soar step " in line]
    assert len(steps) == 3 and all(line.startswith("[default0]:") for line in steps), steps  # rank 0 logs
    shown = [line for line in out.splitlines() if "validation at step" in line]
    assert len(shown) == 1 and shown[0].startswith("[default0]:"), shown  # step 2, rank 0 only

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("launch-test").experiment_id],
                              filter_string="tags.stage = 'train'")  # (the embed stage has its own run)
    assert len(runs) == 1  # one run: only the main process opened one
    history = client.get_metric_history(runs[0].info.run_id, "loss_aux")
    assert sorted(m.step for m in history) == [1, 2, 3]
    monkeypatch.chdir(work)  # the store is at the repository root: its artifact paths are relative to it
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "validation")] == ["validation/step_000002.png"]


@pytest.mark.slow
def test_two_process_run_saves_a_trained_transformer(two_process_run):
    work, proc = two_process_run
    assert proc.returncode == 0
    trained = load_file(next((work / "models" / "soar" / "transformer").glob("*.safetensors")))
    base = load_file(next((work / "base" / "transformer").glob("*.safetensors")))
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert all(torch.isfinite(v).all() for v in trained.values())


# --- accelerate / DeepSpeed config files -------------------------------------------------------------

CONFIGS = {  # file -> (distributed_type, num_machines, num_processes)
    "cpu.yaml": ("NO", 1, 1),
    "cpu_multi.yaml": ("MULTI_GPU", 1, 2),
    "single_gpu.yaml": ("NO", 1, 1),
    "multi_gpu.yaml": ("MULTI_GPU", 1, 8),
    "zero2.yaml": ("DEEPSPEED", 1, 8),
    "multi_node.yaml": ("DEEPSPEED", 2, 16),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = LAUNCH / name
    assert path.read_text().startswith("# accelerate config:")  # says when to use it
    raw = yaml.safe_load(path.read_text())
    for key in ("compute_environment", "distributed_type", "num_machines", "num_processes", "machine_rank"):
        assert key in raw, (name, key)
    cfg = ClusterConfig.from_yaml_file(str(path))  # what `accelerate launch --config_file` reads
    kind, machines, processes = CONFIGS[name]
    got = (str(cfg.distributed_type).split(".")[-1], cfg.num_machines, cfg.num_processes)
    assert got == (kind, machines, processes)
    if kind == "DEEPSPEED":
        ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file == LAUNCH / "ds_zero2.json"
        assert cfg.mixed_precision is None  # accelerate rejects mixed_precision next to a deepspeed_config_file
    if machines > 1:
        assert raw["rdzv_backend"] == "static" and raw["same_network"] and raw["main_process_port"]
        assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"  # torchrun per node, no ssh


def test_deepspeed_json_is_zero2_with_auto_values():
    ds = json.loads((LAUNCH / "ds_zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    assert "optimizer" not in ds and "scheduler" not in ds  # the trainer's AdamW and LR schedule are used


@pytest.mark.slow
def test_slurm_script_wraps_accelerate_launch():
    text = (LAUNCH / "slurm_train.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm_train.sbatch")]).returncode == 0
    for piece in ("srun", "accelerate launch", "multi_node.yaml", "--machine_rank", "$SLURM_NODEID",
                  "--main_process_ip", "--num_machines", "$SLURM_NNODES"):
        assert piece in text, piece
