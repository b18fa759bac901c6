"""The typed configuration: the repo's params.yaml loads; bad keys, types and ranges name the key."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import yaml

from pipeline.config import SECTIONS, ConfigError, load_config, parse_config, read_params
from pipeline.deps import all_stages, cmd_entries

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
    ("soar.cfg_scale_sampling", KeyError, "params.yaml.soar.cfg_scale_sampling: missing key"),
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
    assert "mixed_precision: no\n" in text
    (tmp_path / "params.yaml").write_text(text.replace("learning_rate: 1.0e-4", "learning_rate: 1e-4"))
    cfg = load_config(tmp_path / "params.yaml")
    assert cfg.train.mixed_precision == "no" and cfg.train.learning_rate == 1e-4


def test_missing_section_and_file(raw, tmp_path):
    data = copy.deepcopy(raw)
    del data["score"]
    with pytest.raises(ConfigError, match="missing section 'score'"):
        parse_config(data)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


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
        launched = {"launch"} if "accelerate launch" in str(stage.cmd) else set()  # read by the command line
        if hasattr(module, "METHOD_PARAMS"):  # one foreach entry per method; `reads` names its own section
            for method, entry in dvc[stage.name]["foreach"].items():
                declared = _declared_sections(spec) | {entry["reads"]}
                assert declared == set(module.METHOD_PARAMS[method]) | launched, (stage.label, method)
                assert set(module.METHOD_PARAMS[method]) <= set(SECTIONS)
        else:
            assert _declared_sections(spec) == set(module.PARAMS) | launched, stage.label
            assert set(module.PARAMS) <= set(SECTIONS)
    train = importlib.import_module("stages.train")
    assert "soar" not in train.METHOD_PARAMS["sft"]  # SFT must not rerun when a SOAR knob changes
