"""Every numeric key of every section is range-checked where params.yaml is parsed.

``BAD`` has one row per numeric key (found by walking the dataclasses, so a new key without a row fails
``test_every_numeric_key_has_a_row``): a value outside what the key allows, or ``UNBOUNDED`` with the
reason any finite number is meaningful. Each bad value must give a ``ConfigError`` naming the dotted key,
the value and what is allowed; every float key must refuse NaN and infinity (YAML ``.nan`` / ``.inf``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import pytest

from pipeline.config import Config, ConfigError, parse_config, read_params

ROOT = Path(__file__).resolve().parents[1]
UNBOUNDED = "unbounded"  # any finite value means something
NUMBER = (int, float)

LOOP = {  # train and pretrain share TrainConfig
    "seed": -1, "learning_rate": 0.0, "lr_warmup_steps": -1, "adam_weight_decay": -0.1, "max_grad_norm": -1.0,
    "train_batch_size": 0, "gradient_accumulation_steps": 0, "max_train_steps": 0, "checkpointing_steps": -1,
    "checkpoints_total_limit": 0, "snapshot_steps": -1, "ema_decay": 1.0, "log_every": 0,
    "logit_mean": UNBOUNDED,  # the logit-normal density's mean: any real shifts it
    "logit_std": 0.0, "mode_scale": 0.0, "cond_dropout_rate": 1.0, "lora_rank": 0, "lora_alpha": 0.0,
    "validation_steps": -1, "validation_num_inference_steps": 0, "validation_guidance_scale": -1.0,
    "validation_resolution": 0, "validation_seed": -1,
}
GRPO_LOOP = {k: v for k, v in LOOP.items()  # grpo has the loop, LoRA and validation keys, not the objective's
             if k not in ("train_batch_size", "gradient_accumulation_steps", "logit_mean", "logit_std", "mode_scale",
                          "cond_dropout_rate")}
BAD = {
    "synth.num_images": 0, "synth.num_grpo_prompts": -1,
    "synth.image_size": 0, "synth.degraded_fraction": 1.0, "synth.text_fraction": -0.1,
    "synth.num_eval_geneval": -1, "synth.num_eval_ocr": -1, "synth.num_heldout": -1, "synth.seed": -1,
    "data.quality_threshold": UNBOUNDED,  # a score threshold on the filter's own scale (the tests use -1e9)
    "data.dataloader_num_workers": -1,
    "data.image_memory_mib": -1,
    "model.t5_max_length": 0,
    **{f"model.tiny.{k}": 0 for k in ("sample_size", "patch_size", "num_layers", "num_attention_heads",
                                       "attention_head_dim", "joint_attention_dim", "pooled_projection_dim",
                                       "caption_projection_dim", "text_hidden_size", "text_layers",
                                       "text_max_length")},
    "model.tiny.shift": 0.0,
    **{f"pretrain.{k}": v for k, v in LOOP.items()}, **{f"train.{k}": v for k, v in LOOP.items()},
    "soar.lambda_aux": -1.0, "soar.num_rollout_paths": 0, "soar.trajectory_length": -1, "soar.num_sampling_steps": 0,
    "soar.sde_noise_scale": -0.5, "soar.cfg_scale_sampling": -1.0, "soar.sigma_upper_ratio": 0.5,
    "soar.aux_microbatch": 0,
    **{f"grpo.{k}": v for k, v in GRPO_LOOP.items()},
    "grpo.prompts_per_iteration": 0, "grpo.num_image_per_prompt": 1,
    "grpo.updates_per_iteration": 0, "grpo.sample_batch_size": 0, "grpo.train_batch_size": 0, "grpo.num_steps": 0,
    "grpo.guidance_scale": -1.0, "grpo.noise_level": 0.0, "grpo.resolution": 0, "grpo.timestep_fraction": 1.5,
    "grpo.clip_range": 0.0, "grpo.adv_clip_max": 0.0, "grpo.beta": -0.1,
    "sample.num_inference_steps": 0, "sample.guidance_scale": -1.0, "sample.resolution": 0, "sample.batch_size": 0,
    "sample.t5_max_length": 0, "sample.seed": -1, "sample.grid_prompts": -1,
    "sample.prompt_sets.geneval.images_per_prompt": 0,
    "score.ocr_upscale": 0, "score.batch_size": 0,
    "dynamics.max_prompts_per_set": 0,
    "study.seeds": [0, -1], "study.lambda_aux": [0.5, 0.0], "study.trajectory_length": [0],
    "study.sampling_steps": [0], "study.heldout_images": 0, "study.drift_starts": [-1], "study.drift_max_k": 0,
    "study.drift_seed": -1, "study.confidence": 1.0,
    "launch.num_processes": 0, "launch.num_machines": 0, "mlflow.grid_images": 0,
}


def numeric(tp) -> bool:
    """Whether annotation ``tp`` is a number, an optional number or a list of numbers."""
    if tp in NUMBER:
        return True
    origin = get_origin(tp)
    if origin in (Union, types.UnionType, list, tuple):
        return any(numeric(a) for a in get_args(tp) if a is not type(None))
    return False


def numeric_keys(cls, prefix: str) -> dict[str, object]:
    """Dotted key -> annotation of every numeric field under dataclass ``cls`` (nested sections included)."""
    out = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        options = [a for a in get_args(tp) if a is not type(None)] or [tp]
        if dataclasses.is_dataclass(options[0]):
            out.update(numeric_keys(options[0], f"{key}."))
        elif get_origin(tp) is dict:
            (_, value_tp) = get_args(tp)
            if dataclasses.is_dataclass(value_tp):  # one named entry stands for all: the tiny profile's geneval
                out.update(numeric_keys(value_tp, f"{key}.geneval."))
        elif numeric(tp):
            out[key] = tp
    return out


KEYS = numeric_keys(Config, "")


@pytest.fixture(scope="module")
def raw() -> dict:
    return read_params(ROOT / "params.yaml")


def edited(raw: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[last] = value
    return data


def test_every_numeric_key_has_a_row():
    assert len(KEYS) > 100  # the walk finds the sections' keys, not an empty set
    assert sorted(set(KEYS) - set(BAD)) == [], "numeric keys without a row in BAD"
    assert sorted(set(BAD) - set(KEYS)) == [], "rows for keys that do not exist"


@pytest.mark.parametrize("key", sorted(k for k, v in BAD.items() if v != UNBOUNDED))
def test_out_of_range_names_the_key_the_value_and_the_range(raw, key):
    value = BAD[key]
    with pytest.raises(ConfigError) as err:
        parse_config(edited(raw, key, value))
    message = str(err.value)
    assert message.startswith(f"params.yaml.{key}:"), message
    assert "must" in message or "needs" in message  # what is allowed
    if not isinstance(value, list):
        assert f"got {float(value)!r}" in message or f"got {value!r}" in message, message


@pytest.mark.parametrize("key", sorted(k for k, tp in KEYS.items() if float in (tp, *get_args(tp))
                                       or any(float in get_args(a) for a in get_args(tp))))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_keys_refuse_nan_and_infinity(raw, key, value):
    bad = [0.5, value] if isinstance(BAD[key], list) else value
    with pytest.raises(ConfigError) as err:
        parse_config(edited(raw, key, bad))
    where = f"{key}[1]" if isinstance(bad, list) else key
    assert str(err.value).startswith(f"params.yaml.{where}: must be a finite number, got"), str(err.value)


def test_good_values_at_the_edges_pass(raw):
    edges = {"train.max_grad_norm": 1e-6, "train.lr_warmup_steps": 0, "sample.guidance_scale": 0.0,
             "soar.cfg_scale_sampling": 1.0, "synth.num_heldout": 0, "launch.num_machines": 1}
    for key, value in edges.items():
        parse_config(edited(raw, key, value))


def test_a_scored_set_must_be_sampled(raw):
    data = edited(raw, "score.scorers", {"geneval": ["geneval"], "drawbench": ["pickscore"]})
    with pytest.raises(ConfigError, match=r"score\.scorers\.drawbench: no prompt set of that name in "
                                          r"sample\.prompt_sets \(it has: geneval, ocr\)"):
        parse_config(data)


def test_launch_counts_processes_over_all_machines(raw):
    data = edited(edited(raw, "launch.num_machines", 2), "launch.num_processes", 1)
    with pytest.raises(ConfigError, match=r"launch\.num_processes: is accelerate's total .* got 1"):
        parse_config(data)
