"""The typed configuration: the repo's params.yaml loads; bad keys, types and ranges name the key."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import yaml

from pipeline.config import PRETRAIN, SECTIONS, ConfigError, ScoreConfig, load_config, parse_config, read_params
from pipeline.deps import all_stages, cmd_entries
from soar.finetune import OPTIMIZERS
from soar.flow import WEIGHTING_SCHEMES, FlowMatchingConfig
from soar.rollout import STOCHASTIC_STEPS, SoarConfig
from soar.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return read_params(ROOT / "params.yaml")


def test_repo_params_load(raw):
    cfg = parse_config(raw)
    assert cfg.soar.trajectory_length == 6 and cfg.soar.sigma_upper_ratio is None
    assert cfg.sample.prompt_sets["geneval"].format == "geneval"
    assert cfg.train.learning_rate > 0 and isinstance(cfg.train.learning_rate, float)


def edited(raw, dotted: str, value):
    data = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(("key", "value", "message"), [
    ("soar.lambda_auxx", 1.0, "params.yaml.soar.lambda_auxx: unknown key"),
    ("soar.lambda_aux", "big", "params.yaml.soar.lambda_aux: expected a number"),
    ("train.max_train_steps", 1.5, "params.yaml.train.max_train_steps: expected an integer"),
    ("train.gradient_checkpointing", "yes", "params.yaml.train.gradient_checkpointing: expected bool"),
    ("soar.sde_rollout_type", "ddim", "params.yaml.soar.sde_rollout_type: 'ddim' is not one of"),
    ("soar.trajectory_length", -1, "params.yaml.soar.trajectory_length: must be >= 0"),
    ("soar.sde_noise_scale", -0.1, "params.yaml.soar.sde_noise_scale: must be >= 0"),
    ("soar.num_rollout_paths", 0, "params.yaml.soar.num_rollout_paths: must be >= 1"),
    ("soar.sigma_upper_ratio", 0.5, "params.yaml.soar.sigma_upper_ratio: must be null or >= 1"),
    ("soar.sigma_sampling", "cont", "params.yaml.soar.sigma_sampling: 'cont' is not one of"),
    ("model.tiny.patch_size", 5, "params.yaml.model.tiny.sample_size: must divide by patch_size"),
    ("sample.prompt_sets.ocr.format", "csv", "params.yaml.sample.prompt_sets.ocr.format: 'csv' is not one of"),
    ("train.seed", True, "params.yaml.train.seed: expected an integer"),
    ("train.snapshot_steps", -1, "params.yaml.train.snapshot_steps: must be >= 0"),
    ("dynamics.max_prompts_per_set", 0, "params.yaml.dynamics.max_prompts_per_set: must be null or >= 1"),
])
def test_bad_values_name_the_key(raw, key, value, message):
    with pytest.raises(ConfigError) as err:
        parse_config(edited(raw, key, value))
    assert message in str(err.value)


def test_params_as_dvc_rewrites_them_load(tmp_path):
    """`dvc exp run -S` rewrites params.yaml as YAML 1.2: `no` unquoted must stay the string "no"."""
    text = (ROOT / "params.yaml").read_text().replace('mixed_precision: "no"', "mixed_precision: no")
    assert "mixed_precision: no " in text
    (tmp_path / "params.yaml").write_text(text.replace("learning_rate: 0.0001", "learning_rate: 1e-4"))
    cfg = load_config(tmp_path / "params.yaml")
    assert cfg.train.mixed_precision == "no" and cfg.train.learning_rate == 1e-4


def test_absent_keys_and_sections_keep_their_defaults_and_a_missing_file_is_named(raw, tmp_path):
    data = copy.deepcopy(raw)
    del data["score"], data["soar"]["cfg_scale_sampling"], data["pretrain"]["max_train_steps"]
    data["soar"]["lambda_aux"] = 0.5
    cfg = parse_config(data)
    assert cfg.score == ScoreConfig() and cfg.soar == SoarConfig(lambda_aux=0.5)
    assert cfg.pretrain.max_train_steps == PRETRAIN.max_train_steps != TrainConfig().max_train_steps  # its own base
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match="^trajectory_length: must be >= 0"):
        SoarConfig(trajectory_length=-1)
    with pytest.raises(ConfigError, match="^cond_dropout_rate: must be in"):
        TrainConfig(cond_dropout_rate=1.0)  # an inherited key is checked by its own section


def test_closed_sets_are_the_registries():
    """The names the config accepts are the registries the code dispatches on, not a second list."""
    hints = get_type_hints(SoarConfig)
    assert get_args(hints["sde_rollout_type"]) == tuple(STOCHASTIC_STEPS)
    assert get_args(get_type_hints(FlowMatchingConfig)["weighting_scheme"]) == WEIGHTING_SCHEMES
    assert get_args(get_type_hints(TrainConfig)["optimizer"]) == OPTIMIZERS


def test_sections_view_hides_undeclared(tmp_path):
    cfg = load_config(ROOT / "params.yaml", ("soar",))
    assert cfg.soar is not None and cfg.train is None and cfg.mlflow is None


def _declared_sections(stage: dict) -> set[str]:
    return {p.split(".")[0] for p in stage.get("params", []) if isinstance(p, str) and not p.startswith("${")}


def test_dvc_stages_declare_the_sections_their_code_loads():
    """Every stage of both pipelines declares exactly the params sections that the module its cmd runs loads."""
    for stage in all_stages():
        dvc = yaml.safe_load(stage.dvcfile.read_text())["stages"]
        spec = dvc[stage.name].get("do", dvc[stage.name])
        module = importlib.import_module(cmd_entries(stage.cmd)[0])
        launched = {"launch"} if "accelerate.commands.launch" in str(stage.cmd) else set()  # read by the command line
        if hasattr(module, "METHOD_PARAMS"):  # one foreach entry per method; its fields name its own sections
            fields = [p[len("${item."):-1] for p in spec["params"] if isinstance(p, str) and p.startswith("${item.")]
            for method, entry in dvc[stage.name]["foreach"].items():
                declared = _declared_sections(spec) | {entry[f].split(".")[0] for f in fields}
                assert declared == set(module.METHOD_PARAMS[method]) | launched, (stage.label, method)
                assert set(module.METHOD_PARAMS[method]) <= set(SECTIONS)
        else:
            assert _declared_sections(spec) == set(module.PARAMS) | launched, stage.label
            assert set(module.PARAMS) <= set(SECTIONS)
    train = importlib.import_module("stages.train")
    assert "soar" not in train.METHOD_PARAMS["sft"]  # SFT must not rerun when a SOAR knob changes
    assert not {"train", "data"} & set(train.METHOD_PARAMS["grpo"])  # nor GRPO for an SFT / data knob
