"""What the trainer updates, with which optimiser, and how the result is saved.

Two ways to fine-tune the transformer:

- full fine-tuning (``train.lora_rank: null``): every weight trains; ``transformer/`` is the trained model;
- LoRA (``LoraConfig``): the base weights are frozen and peft LoRA adapters of rank ``lora_rank`` wrap
  the named linear layers, update ``W + (lora_alpha / lora_rank) * B @ A`` (Hu et al. 2021, eq. 3; B starts at
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

from soar.atomic import atomic_folder
from soar.extras import import_extra
from soar.schema import check, positive

OPTIMIZERS = ("adamw", "adamw_8bit")
LORA_DIR = "transformer_lora"  # adapter weights beside the merged transformer/


@dataclass(frozen=True)
class LoraConfig:
    """The ``train.lora_*`` keys (``soar.train_config.TrainConfig`` inherits them)."""

    lora_rank: int | None = None  # null = full fine-tuning (the paper); r = train peft LoRA adapters of rank r
    lora_alpha: float = 64.0  # LoRA scale numerator: update = (lora_alpha / lora_rank) * B @ A
    lora_target_modules: list[str] = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                      "add_v_proj", "to_add_out")  # linear layers LoRA wraps (SD3 attention)

    def __post_init__(self) -> None:
        check(self.lora_rank is None or self.lora_rank >= 1, "lora_rank", "must be null or >= 1")
        positive(self, "lora_alpha")
        check(self.lora_rank is None or len(self.lora_target_modules) > 0, "lora_target_modules",
              "must name at least one module when lora_rank is set")


def uses_lora(lora: LoraConfig | None) -> bool:
    """True when ``lora`` asks for adapters (None or ``lora_rank: null``: full fine-tuning)."""
    return lora is not None and lora.lora_rank is not None


def prepare_trainable(transformer, lora: LoraConfig | None, seed: int) -> list[torch.nn.Parameter]:
    """Set what trains (all weights, or LoRA adapters added here) and return those parameters, in order.

    peft draws the adapters' initial values from torch's global generator (of the transformer's device):
    they are drawn under ``seed`` inside ``fork_rng``, so a run is reproducible and the caller's global
    generator state is left as it was.
    """
    if not uses_lora(lora):
        transformer.requires_grad_(True)
    else:
        peft = import_extra("peft", "lora")
        transformer.requires_grad_(False)
        config = peft.LoraConfig(r=lora.lora_rank, lora_alpha=lora.lora_alpha, init_lora_weights="gaussian",
                                 target_modules=list(lora.lora_target_modules))
        device = next(transformer.parameters()).device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                transformer.add_adapter(config)
        except ValueError as exc:  # peft: target modules not found
            raise ValueError(f"train.lora_target_modules={list(lora.lora_target_modules)}: {exc}") from exc
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


def save_model(transformer, folder: Path, lora: LoraConfig | None) -> None:
    """Save ``transformer`` (unwrapped) in diffusers format to ``folder``.

    With LoRA the adapters go to ``{folder.parent}/{LORA_DIR}`` (or ``{folder}_lora`` for another name)
    and are then merged into the base weights and removed, so ``folder`` holds a plain transformer.
    This changes ``transformer`` in place: call it last.
    """
    if uses_lora(lora):
        lora_dir = folder.parent / LORA_DIR if folder.name == "transformer" else folder.with_name(folder.name + "_lora")
        with atomic_folder(lora_dir) as tmp:
            transformer.save_lora_adapter(tmp)
        transformer.fuse_lora()
        transformer.unload_lora()
    with atomic_folder(folder) as tmp:  # complete or absent, also when the process dies while saving
        transformer.save_pretrained(tmp)
