"""The study's runs: which models it trains (seeds, sweep cells), their names, and the config each trains with.

No torch here: the report stage reads the same names without loading the training code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.config import Config

BASE = "base"


@dataclass(frozen=True)
class Variant:
    """One trained (or the base) model of the study."""

    method: str  # "base", "sft", "soar" or "grpo"
    seed: int | None = None  # train.seed, or grpo.seed for GRPO (None for the base)
    lambda_aux: float | None = None  # soar.lambda_aux (SOAR only)
    trajectory_length: int | None = None  # soar.trajectory_length (SOAR only)
    sweep: bool = False  # a sweep cell (evaluated at sample.num_inference_steps only)

    @property
    def group(self) -> str:
        """The configuration: the seeds of one group are compared together (``sft``, ``soar``, ``sweep ...``)."""
        if not self.sweep:
            return self.method
        return f"sweep lambda_aux={self.lambda_aux} trajectory_length={self.trajectory_length}"

    @property
    def name(self) -> str:
        """Folder and run name: ``base``, ``sft-s0``, ``soar-s0``, ``grpo-s0``, ``sweep-l0.5-T1`` (as study/dvc.yaml
        spells them)."""
        if self.sweep:
            return f"sweep-l{self.lambda_aux}-T{self.trajectory_length}"
        return self.method if self.method == BASE else f"{self.method}-s{self.seed}"


def seed_variants(cfg: Config) -> list[Variant]:
    """SFT, SOAR (the ``soar`` section's lambda_aux and trajectory_length) and GRPO (the ``grpo`` section) for every
    ``study.seeds``."""
    soar = cfg.soar
    return [v for s in cfg.study.seeds for v in (Variant("sft", s), Variant("soar", s, soar.lambda_aux,
                                                                             soar.trajectory_length),
                                                 Variant("grpo", s))]


def sweep_variants(cfg: Config) -> list[Variant]:
    """SOAR at every ``study.lambda_aux`` x ``study.trajectory_length``, seed ``study.seeds[0]``."""
    st = cfg.study
    return [Variant("soar", st.seeds[0], float(lam), int(t), sweep=True)
            for lam in st.lambda_aux for t in st.trajectory_length]


def find_variant(cfg: Config, name: str) -> Variant:
    """The variant called ``name`` (base, a seed run or a sweep cell); an unknown name lists the known ones."""
    known = {v.name: v for v in [Variant(BASE), *seed_variants(cfg), *sweep_variants(cfg)]}
    if name not in known:
        raise SystemExit(f"unknown study run {name!r}; known: {', '.join(known)}")
    return known[name]


def variant_config(cfg: Config, variant: Variant) -> Config:
    """``cfg`` as ``variant`` trains: its seed and SOAR settings; validation, snapshots and checkpoints off; GRPO
    from the base model (``grpo.init_from`` is the main pipeline's choice: the study compares arms from one start)."""
    if variant.method == BASE:
        return cfg
    off = dict(seed=variant.seed, validation_steps=0, snapshot_steps=0, checkpointing_steps=0,
               resume_from_checkpoint=None)
    if variant.method == "grpo":  # from the base model, as every arm of the study
        return dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, init_from=BASE, **off))
    train = dataclasses.replace(cfg.train, **off)
    soar = None if variant.method == "sft" else dataclasses.replace(
        cfg.soar, lambda_aux=variant.lambda_aux, trajectory_length=variant.trajectory_length)
    return dataclasses.replace(cfg, train=train, soar=soar)
