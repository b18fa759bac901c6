"""LoRA (peft) and 8-bit AdamW in the trainer; bundles loaded without their text encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import TRAIN_CAPTIONS, train_config
from safetensors.torch import load_file
from test_checkpoint import LOOP, RECORDS, SOAR, assert_same, load, run_train

from soar.finetune import LORA_DIR, LoraConfig, make_optimizer, prepare_trainable
from soar.models.bundle import load_bundle, load_transformer
from soar.text_cache import encode_table
from soar.trainer import train

pytest.importorskip("peft")
LORA = dict(lora_rank=2, lora_alpha=4.0, lora_target_modules=("to_q", "to_k", "to_v", "to_out.0"))
PLAIN = dict(gradient_accumulation_steps=1, max_train_steps=3, checkpointing_steps=0, ema_decay=None,
             resume_from_checkpoint=None)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    from helpers import write_tiny_training_world

    model_dir, image_dir, _ = write_tiny_training_world(tmp_path_factory.mktemp("ft_world"))
    return model_dir, image_dir


def test_lora_trains_only_adapters_and_saves_the_exact_merge(world, tmp_path):
    model_dir, image_dir = world
    run_train(model_dir, image_dir, tmp_path, **LORA, **PLAIN)
    base = load_transformer(model_dir / "transformer").state_dict()
    merged = load_transformer(tmp_path / "transformer").state_dict()
    adapters = load_file(tmp_path / LORA_DIR / "pytorch_lora_weights.safetensors")
    assert base.keys() == merged.keys()  # a plain transformer: no lora_A / base_layer keys
    wrapped = {k.removesuffix(".lora_A.weight") for k in adapters if k.endswith(".lora_A.weight")}
    assert wrapped and all(k.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v"} or k.endswith("to_out.0") for k in wrapped)
    merged_layers = 0
    for name in base:
        module = name.removeprefix("transformer.").rsplit(".", 1)[0]
        if name.endswith(".weight") and module in wrapped:
            a = adapters[f"{module}.lora_A.weight"].double()  # [r, in]
            b = adapters[f"{module}.lora_B.weight"].double()  # [out, r]
            assert b.abs().max() > 0  # trained away from the zero init
            expected = base[name].double() + (LORA["lora_alpha"] / LORA["lora_rank"]) * b @ a  # W + (alpha / r) B A
            torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6)
            merged_layers += 1
        else:  # frozen: bit-identical
            assert torch.equal(merged[name], base[name]), name
    assert merged_layers == len(wrapped)  # every adapter was checked against its layer


def test_lora_with_ema_and_gradient_checkpointing_keeps_the_trained_adapters(world, tmp_path):
    model_dir, image_dir = world
    run_train(model_dir, image_dir, tmp_path, **LORA, **{**PLAIN, "ema_decay": 0.5},
              gradient_checkpointing=True)
    raw = load_file(tmp_path / "transformer_raw_lora" / "pytorch_lora_weights.safetensors")
    ema = load_file(tmp_path / LORA_DIR / "pytorch_lora_weights.safetensors")
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # EMA weights differ from the last ones
    assert all(torch.isfinite(v).all() for v in raw.values())
    assert any(k.endswith("lora_B.weight") and raw[k].abs().max() > 0 for k in raw)  # grads flowed (checkpointing)


def test_unknown_lora_target_is_an_error_naming_the_key(world):
    bundle = load_bundle(world[0])
    with pytest.raises(ValueError, match="train.lora_target_modules"):
        no_layer = LoraConfig(lora_rank=2, lora_alpha=2.0, lora_target_modules=("no_such_layer",))
        prepare_trainable(bundle.transformer, no_layer, seed=0)


def test_adamw_8bit_trains_and_resumes_exactly(world, tmp_path):
    pytest.importorskip("bitsandbytes")
    model_dir, image_dir = world
    settings = dict(optimizer="adamw_8bit", gradient_accumulation_steps=1, max_train_steps=4, checkpointing_steps=2,
                    ema_decay=None, resume_from_checkpoint="latest")
    run_train(model_dir, image_dir, tmp_path / "straight", **settings)
    run_train(model_dir, image_dir, tmp_path / "split", **{**settings, "max_train_steps": 2})
    run_train(model_dir, image_dir, tmp_path / "split", **settings)  # resumes from checkpoint-2
    straight = load(tmp_path / "straight" / "transformer" / "diffusion_pytorch_model.safetensors")
    split = load(tmp_path / "split" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load(model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert_same(straight, split)
    assert any(not torch.equal(straight[k], base[k]) for k in base)
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(4096))], "adamw_8bit", 1e-3, 0.0)
    assert type(optimizer).__module__.startswith("bitsandbytes")


def test_unknown_optimizer_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="train.optimizer"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], "sgd", 1e-3, 0.0)


def test_bundle_without_text_encoders_trains_from_a_text_table(world, tmp_path):
    model_dir, image_dir = world
    table = encode_table(load_bundle(model_dir), [*TRAIN_CAPTIONS, ""])
    bundle = load_bundle(model_dir, text_encoders=False)
    assert bundle.clip_encoders == [] and bundle.t5_encoder is None
    with pytest.raises(RuntimeError, match="no text encoders"):
        bundle.encode_prompts(["a photo of a red circle"])
    loop = train_config(**{**LOOP, **PLAIN, "max_train_steps": 1})
    accelerator = Accelerator(cpu=True)
    metrics = train(bundle, RECORDS, image_dir, loop, SOAR, tmp_path, accelerator, lambda m, s: None, text=table)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert (tmp_path / "transformer" / "config.json").is_file()


def test_lora_runs_are_reproducible_whatever_the_global_generator(world, tmp_path):
    model_dir, image_dir = world
    torch.manual_seed(123)
    run_train(model_dir, image_dir, tmp_path / "a", **LORA, **PLAIN)
    torch.manual_seed(456)  # peft initialises adapters from the global generator: the trainer seeds it
    run_train(model_dir, image_dir, tmp_path / "b", **LORA, **PLAIN)
    a = load_file(tmp_path / "a" / LORA_DIR / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / LORA_DIR / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
