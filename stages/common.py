"""Shared plumbing of the stage entry points: loading the declared params, logging setup."""

from __future__ import annotations

import logging
import os
import sys

from pipeline.config import Config, load_config

PARAMS_FILE = os.environ.get("SOAR_PARAMS", "params.yaml")  # stages run from the repo root under DVC


def load(sections: tuple[str, ...]) -> Config:
    """Validate params.yaml and return only ``sections`` (a stage's declared params)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return load_config(PARAMS_FILE, sections)


def declared(cfg: Config, sections: tuple[str, ...]) -> dict:
    """The declared sections as a dict, for MLflow ``log_params``."""
    return {s: getattr(cfg, s) for s in sections}
