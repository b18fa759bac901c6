"""Shared plumbing of the stage entry points: loading the declared params, logging setup, one-line errors."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable
from types import ModuleType

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


# Library log messages known to be harmless here, dropped by exact message (logger name -> message regex)
HARMLESS_LOG_MESSAGES = {
    # diffusers warns at every ``model.to(dtype)`` of a model, naming the modules it should keep in float32:
    # sampling casts the transformer and the VAE to bf16 on a GPU and the dynamics stage casts each snapshot
    # (pipeline.sample_sets.open_bundle, pipeline.dynamics.SnapshotLoader). With an empty list no module needs
    # float32, so nothing is cast that should not be; a model that does name modules still warns.
    "diffusers.models.modeling_utils": r"There are modules in \w+ that should be kept in float32: \[\]\.",
    # DeepSpeed, imported by accelerate when installed (unwrap_model, save_pretrained), says it found no GPU: the
    # project picks CPU or CUDA itself (pipeline.training.make_accelerator) and runs DeepSpeed on the CPU only
    # when DS_ACCELERATOR=cpu asks for it (pipeline.training.deepspeed_launch)
    "DeepSpeed": r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it\.",
}


class DropMessage(logging.Filter):
    """A logger filter dropping the records whose message matches ``pattern`` (from its start)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


class AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot ``sys.meta_path`` finder: once module ``name`` is first imported (executed), ``action(module)``
    runs. The normal finders still find and load the module; this only wraps its loader's ``exec_module``."""

    def __init__(self, name: str, action: Callable[[ModuleType], None]) -> None:
        self.name, self.action = name, action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot, and out of the way of the lookup below
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_act(module: ModuleType) -> None:
                exec_module(module)
                self.action(module)

            spec.loader.exec_module = exec_then_act  # this module's own loader instance
        return spec


def after_import(name: str, action: Callable[[ModuleType], None]) -> None:
    """Call ``action(module)`` on module ``name``: now when it is imported, else right after its first import.
    Configures a library without importing it (diffusers' import takes seconds, so a stage that never uses it
    must not pay for it); idempotent: one pending hook per module."""
    if name in sys.modules:
        action(sys.modules[name])
    elif not any(isinstance(f, AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImport(name, action))


def quiet_libraries() -> None:
    """Silence library output a stage's user has no use for; idempotent; imports none of the libraries (a
    library imported later is quieted as it loads).

    - progress bars of diffusers (model and pipeline loading, "Loading pipeline components"), transformers ("Loading
      weights", "Loading checkpoint shards", "Writing model shards" when the tiny model is written) and
      huggingface_hub (downloads; ``HF_HUB_DISABLE_PROGRESS_BARS`` also reaches child processes, and transformers
      follows huggingface_hub's setting when it loads): under DVC the output is no terminal and each bar is a
      carriage-return line; the stages print their own progress (``soar.progress``);
    - the messages of ``HARMLESS_LOG_MESSAGES``, each by its exact text: a library's other warnings still show.
    """
    import huggingface_hub.utils  # light, and read by transformers when it loads

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    huggingface_hub.utils.disable_progress_bars()
    after_import("transformers.utils.logging", lambda module: module.disable_progress_bar())
    after_import("diffusers.utils.logging", lambda module: module.disable_progress_bar())
    for name, pattern in HARMLESS_LOG_MESSAGES.items():
        logger = logging.getLogger(name)  # DeepSpeed's logger keeps this filter when it is set up later
        if not any(isinstance(f, DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMessage(pattern))


def load(sections: tuple[str, ...]) -> Config:
    """Validate params.yaml and return only ``sections`` (a stage's declared params); quiets the libraries."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_libraries()
    return load_config(PARAMS_FILE, sections)


def declared(cfg: Config, sections: tuple[str, ...]) -> dict:
    """The declared sections as a dict, for MLflow ``log_params``."""
    return {s: getattr(cfg, s) for s in sections}
