"""What the trainer updates, with which optimiser, and how the result is saved.

Two ways to fine-tune the transformer:

- full fine-tuning (``lora is None``): every weight trains; ``transformer/`` is the trained model;
- LoRA (``LoraSettings``): the base weights are frozen and peft LoRA adapters of rank ``rank`` wrap
  the named linear layers, update ``W + (alpha / rank) * B @ A`` (Hu et al. 2021, eq. 3; B starts at
  zero, so step 0 is the base model). The adapters alone go to ``transformer_lora/`` (diffusers'
  ``save_lora_adapter`` format, loadable with ``load_lora_adapter``) and the merged model to
  ``transformer/``, so sampling and scoring open it like any other transformer.

Optimisers: ``adamw`` (``torch.optim.AdamW``) or ``adamw_8bit`` (bitsandbytes ``AdamW8bit``: block-wise
8-bit moments, about 2 bytes less per parameter and moment; optional extra ``bnb``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from soar.extras import import_extra

OPTIMIZERS = ("adamw", "adamw_8bit")
LORA_DIR = "transformer_lora"  # adapter weights beside the merged transformer/


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA on the transformer (fields as ``train.lora_*`` in ``pipeline.config.TrainConfig``)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]


def prepare_trainable(transformer, lora: LoraSettings | None, seed: int) -> list[torch.nn.Parameter]:
    """Set what trains (all weights, or LoRA adapters added here) and return those parameters, in order.

    peft draws the adapters' initial values from torch's global generator (of the transformer's device):
    they are drawn under ``seed`` inside ``fork_rng``, so a run is reproducible and the caller's global
    generator state is left as it was.
    """
    if lora is None:
        transformer.requires_grad_(True)
    else:
        peft = import_extra("peft", "lora")
        transformer.requires_grad_(False)
        config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian",
                                 target_modules=list(lora.target_modules))
        device = next(transformer.parameters()).device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                transformer.add_adapter(config)
        except ValueError as exc:  # peft: target modules not found
            raise ValueError(f"train.lora_target_modules={list(lora.target_modules)}: {exc}") from exc
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient (check train.lora_target_modules)")
    return params


def make_optimizer(params: Sequence[torch.nn.Parameter], kind: str, lr: float, weight_decay: float):
    """AdamW over ``params``: torch's (``adamw``) or bitsandbytes' 8-bit one (``adamw_8bit``)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw_8bit":
        bnb = import_extra("bitsandbytes", "bnb")
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {kind!r}; known: {', '.join(OPTIMIZERS)}")


def save_model(transformer, folder: Path, lora: LoraSettings | None) -> None:
    """Save ``transformer`` (unwrapped) in diffusers format to ``folder``.

    With LoRA the adapters go to ``{folder.parent}/{LORA_DIR}`` (or ``{folder}_lora`` for another name)
    and are then merged into the base weights and removed, so ``folder`` holds a plain transformer.
    This changes ``transformer`` in place: call it last.
    """
    if lora is not None:
        lora_dir = folder.parent / LORA_DIR if folder.name == "transformer" else folder.with_name(folder.name + "_lora")
        transformer.save_lora_adapter(lora_dir)
        transformer.fuse_lora()
        transformer.unload_lora()
    transformer.save_pretrained(folder)
