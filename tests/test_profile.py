"""Profiles are overlays of the defaults; params.yaml is their full, commented rendering."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML

from pipeline import profile
from pipeline.config import Config, ConfigError, load_config, parse_config
from soar.models.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]


def settings_classes() -> set[type]:
    """Every settings dataclass reachable from the default ``Config`` (sections, nested ones, mapping values, bases)."""
    found = {Config}
    stack = [Config()]
    while stack:
        obj = stack.pop()
        for value in (getattr(obj, f.name) for f in dataclasses.fields(obj)):
            items = value.values() if hasattr(value, "values") else [value]
            for item in items:
                if dataclasses.is_dataclass(item):
                    found |= {k for k in type(item).__mro__ if dataclasses.is_dataclass(k)}
                    stack.append(item)
    return found


def test_committed_params_is_the_tiny_rendering_and_loads_as_the_defaults():
    text = (ROOT / "params.yaml").read_text()
    assert text == profile.render(Config(), "tiny"), "params.yaml is stale: run `python -m pipeline.profile tiny`"
    assert load_config(ROOT / "params.yaml") == Config()
    assert profile.current(ROOT) == "tiny"


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_rendering_reads_back_exactly_with_yaml_1_1_and_1_2(name):
    cfg = profile.profile_config(ROOT, name)
    text = profile.render(cfg, name)
    assert parse_config(yaml.safe_load(text)) == cfg  # PyYAML (YAML 1.1)
    assert parse_config(YAML(typ="safe", pure=True).load(text)) == cfg  # ruamel, as DVC reads it (YAML 1.2)


def test_every_key_has_a_comment():
    for cls in settings_classes():
        comments = profile.field_comments(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a comment: {missing}"
    lines = [ln for ln in (ROOT / "params.yaml").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len([ln for ln in lines if not ln.startswith(" ")]) == len(dataclasses.fields(Config))
    entry_depth = None  # the entries of a free-form mapping (prompt set names) are the user's keys: no comment
    for ln in lines[1:]:
        depth = len(ln) - len(ln.lstrip())
        if entry_depth is not None and depth < entry_depth:
            entry_depth = None
        if ln.lstrip().split(":")[0] in ("prompt_sets", "scorers", "reward"):
            entry_depth = depth + 2
        if depth and depth != entry_depth:
            assert "  # " in ln, f"params.yaml: a key without its comment: {ln!r}"


def test_paper_overlay_lists_only_changes_and_gives_the_papers_values():
    overlay = profile.read_params(ROOT / "profiles" / "paper.yaml")
    assert "synth" not in overlay and "pretrain" not in overlay and "soar" not in overlay  # unused or unchanged
    cfg = profile.profile_config(ROOT, "paper")
    t, s = cfg.train, cfg.soar
    assert (t.train_batch_size, cfg.launch.num_processes, t.learning_rate, t.lr_scheduler) == (4, 8, 2e-5, "constant")
    assert (t.max_train_steps, t.checkpointing_steps, t.mixed_precision, t.gradient_checkpointing) == \
        (5000, 1000, "bf16", True)
    assert (t.adam_weight_decay, t.max_grad_norm, t.weighting_scheme, t.seed) == (1e-2, 1.0, "logit_normal", 42)
    assert (s.lambda_aux, s.num_rollout_paths, s.trajectory_length, s.num_sampling_steps) == (1.0, 1, 6, 40)
    assert (s.sde_rollout_type, s.sde_noise_scale, s.cfg_scale_sampling) == ("flow_sde", 0.5, 4.5)
    assert (cfg.sample.num_inference_steps, cfg.sample.guidance_scale, cfg.sample.resolution) == (40, 4.5, 512)
    assert set(cfg.sample.prompt_sets) == {"geneval", "ocr", "drawbench"}  # a mapping is replaced, not merged
    assert cfg.sample.prompt_sets["ocr"].images_per_prompt == 1  # a partial entry completes from its defaults
    assert cfg.data.quality_threshold == 6.8 and cfg.data.prepared_dir == Config().data.prepared_dir
    assert (ROOT / cfg.launch.config_file).is_file()
    with pytest.raises(FileNotFoundError, match=cfg.model.base_path):  # the placeholder path is named
        load_bundle(cfg.model.base_path)


def test_an_overlay_with_an_unknown_key_names_file_and_key(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine.yaml").write_text("train:\n  learning_rate: 3.0e-5\n  lr_sheduler: cosine\n")
    with pytest.raises(ConfigError, match=r"profiles/mine\.yaml\.train\.lr_sheduler: unknown key"):
        profile.profile_config(tmp_path, "mine")
    (tmp_path / "profiles" / "mine.yaml").write_text("sooar:\n  lambda_aux: 2.0\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml\.sooar: unknown key"):
        profile.check(tmp_path, "mine")


@pytest.mark.slow
def test_profile_cli_round_trips(tmp_path):
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.profile", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)

    proc = cli("paper")
    assert proc.returncode == 0, proc.stderr
    assert load_config(tmp_path / "params.yaml") == profile.profile_config(ROOT, "paper")
    assert profile.current(tmp_path) == "paper"
    assert cli("tiny").returncode == 0
    assert (tmp_path / "params.yaml").read_bytes() == (ROOT / "params.yaml").read_bytes()  # back, byte for byte
    # an edited params.yaml (e.g. by `dvc exp run -S`) is not overwritten without --force
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("seed: 42", "seed: 7"))
    proc = cli("paper")
    assert proc.returncode == 1 and "holds values of no profile" in proc.stderr
    assert profile.switch(tmp_path, "paper", force=True) == tmp_path / "params.yaml"
    assert profile.current(tmp_path) == "paper"
    # comments and a key left out (as after a new knob joins the defaults) are not edits: switching proceeds
    text = profile.render(Config(), "tiny").replace("  max_grad_norm: 1.0  # gradient clipping norm\n", "")
    (tmp_path / "params.yaml").write_text("# my notes\n" + text)
    assert profile.current(tmp_path) == "tiny" and cli("paper").returncode == 0
    proc = cli("nope")
    assert proc.returncode == 1 and "no profile 'nope'" in proc.stderr
    (tmp_path / "profiles" / "bad.yaml").write_text("soar:\n  lambda_aux: -1\n")
    proc = cli("--check", "bad")
    assert proc.returncode == 1 and "profiles/bad.yaml.soar.lambda_aux: must be >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr
