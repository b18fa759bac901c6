"""Shared plumbing of the stage entry points: loading the declared params, logging setup, one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from safetensors import SafetensorError

from pipeline.config import Config, load_config

PARAMS_FILE = os.environ.get("SOAR_PARAMS", "params.yaml")  # stages run from the repo root under DVC
DEBUG_ENV = "SOAR_DEBUG"  # set to 1: a stage's error shows its traceback instead of one line
# Errors a user can act on (a bad value, a missing or unwritable file, a full disk, a non-finite loss): the
# project raises these with a message naming what, where and what to do; safetensors reports a failed write
# (e.g. a full disk) as its own error type. Others (TypeError, KeyError, ...) are bugs and keep their traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError, SafetensorError)


def run_main(name: str, main: Callable[..., object], *args: str) -> None:
    """Run stage ``name``'s ``main(*args)``; a ``USER_ERRORS`` error ends it with one line on stderr,
    ``error: <stage>: <message>``, and exit status 1 (under ``accelerate launch`` each failing process prints
    its line, with its rank when there are several)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        main(*args)
        return
    try:
        main(*args)
    except USER_ERRORS as err:
        where = f"{name}@{args[0]}" if args and args[0] else name
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            where += f" (process {os.environ.get('RANK', '?')})"
        text = " ".join([str(err) or type(err).__name__, *getattr(err, "__notes__", ())])  # e.g. the file written
        message = " ".join(text.split())  # one line
        print(f"error: {where}: {message} ({DEBUG_ENV}=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)


def load(sections: tuple[str, ...]) -> Config:
    """Validate params.yaml and return only ``sections`` (a stage's declared params)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return load_config(PARAMS_FILE, sections)


def declared(cfg: Config, sections: tuple[str, ...]) -> dict:
    """The declared sections as a dict, for MLflow ``log_params``."""
    return {s: getattr(cfg, s) for s in sections}
