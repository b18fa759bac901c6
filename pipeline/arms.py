"""The models the pipeline trains and evaluates: the base model and the three post-training arms.

SFT and SOAR start from the base model; Flow-GRPO starts from ``grpo.init_from`` (the base model, or SFT's or
SOAR's result: "SOAR then GRPO" is ``grpo.init_from: soar``). The sample, score and dynamics stages run one
entry per model of ``MODELS``; the report has one row per model and one curve per arm of ``METHODS``.
"""

from __future__ import annotations

BASE = "base"
METHODS = ("sft", "soar", "grpo")  # post-training arms, in the results table's order
MODELS = (BASE, *METHODS)
ROW_NAMES = {BASE: "base", "sft": "+ SFT", "soar": "+ SOAR", "grpo": "+ GRPO"}  # the table's Model cells


def start_model(method: str, init_from: str | None = None) -> str:
    """The model ``method`` starts from: ``base`` for SFT and SOAR, ``init_from`` (``grpo.init_from``) for GRPO."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method != "grpo":
        return BASE
    if init_from is None:
        raise ValueError("the GRPO arm's start needs grpo.init_from")
    return init_from


def row_name(model: str, init_from: str | None = None) -> str:
    """The Model cell / curve label of ``model``; GRPO started from SFT or SOAR reads ``+ SOAR + GRPO``."""
    if model == "grpo" and init_from not in (None, BASE):
        return f"{ROW_NAMES[init_from]} {ROW_NAMES['grpo']}"
    return ROW_NAMES.get(model, model)
