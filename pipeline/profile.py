"""Configuration profiles and the ``params.yaml`` DVC reads: ``python -m pipeline.profile paper|tiny``.

The defaults are stated once, in the settings dataclasses (``pipeline.config``): they are the
embedded tiny profile. A profile is an overlay, ``profiles/<name>.yaml``, that lists only the keys
it changes (a nested section may be given in part; a mapping such as ``sample.prompt_sets`` is
replaced as a whole); ``tiny`` is the empty overlay and needs no file. Switching validates the
overlay (an unknown key is an error naming the file and the dotted key) and writes ``params.yaml``
in full, every key with its comment, so DVC tracks every value and ``dvc exp run -S`` can edit any
of them. A ``params.yaml`` whose values are no profile's holds edits of its own (``dvc exp run -S``,
say); it is overwritten only with ``--force``.

Paths are relative to ``--root`` (default: the current directory, the repository root).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import math
import re
import sys
import textwrap
import tokenize
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.config import Config, parse_config, read_params

PROFILES_DIR = "profiles"
PARAMS_FILE = "params.yaml"
DEFAULT_PROFILE = "tiny"  # the defaults themselves: no overlay file
_PLAIN = re.compile(r"[A-Za-z_./][A-Za-z0-9_./+\-]*")  # strings YAML reads back as the same string, unquoted
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf"}


def profile_path(root: Path, name: str) -> Path:
    return Path(root) / PROFILES_DIR / f"{name}.yaml"


def available(root: Path) -> list[str]:
    """Names of the profiles: ``tiny`` and every ``root/profiles/*.yaml``."""
    return sorted({DEFAULT_PROFILE, *(p.stem for p in (Path(root) / PROFILES_DIR).glob("*.yaml"))})


def profile_config(root: Path, name: str) -> Config:
    """The configuration of profile ``name``: the defaults with its overlay (errors name the file and key)."""
    path = profile_path(root, name)
    if not path.is_file():
        if name == DEFAULT_PROFILE:
            return Config()
        raise FileNotFoundError(f"no profile {name!r}: {path} does not exist (profiles: {', '.join(available(root))})")
    return parse_config(read_params(path), str(path))


# --- rendering ------------------------------------------------------------------------------------------

@cache
def field_comments(cls: type) -> dict[str, str]:
    """``name -> trailing comment`` of the fields declared in ``cls`` and its dataclass bases."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        by_line = {tok.start[0]: tok.string.lstrip("#").strip()
                   for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = by_line.get(node.end_lineno) or by_line.get(node.lineno)
                if text:
                    comments[node.target.id] = text
    return comments


def ordered_fields(cls: type) -> list[str]:
    """Field names, the class's own first, then each base's in MRO order (the loop before what it inherits)."""
    names = [f.name for f in dataclasses.fields(cls)]
    order = [n for klass in cls.__mro__ for n in vars(klass).get("__annotations__", {}) if n in names]
    return list(dict.fromkeys(order))


def scalar(value: Any) -> str:
    """``value`` as a YAML scalar or flow sequence that YAML 1.1 and 1.2 readers both read back exactly."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        if exponent and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        plain = _PLAIN.fullmatch(value) and value.lower() not in _RESERVED
        return value if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to params.yaml")


def _line(indent: int, key: str, text: str, comment: str | None) -> str:
    line = f"{'  ' * indent}{key}:{' ' + text if text else ''}"
    return f"{line}  # {comment}" if comment else line


def _block(value: Any, indent: int) -> list[str]:
    """The lines of a dataclass or mapping ``value`` at ``indent`` (keys with their field comments)."""
    if dataclasses.is_dataclass(value):
        comments = field_comments(type(value))
        items = [(n, getattr(value, n), comments.get(n)) for n in ordered_fields(type(value))]
    else:
        items = [(k, v, None) for k, v in value.items()]
    lines = []
    for key, item, comment in items:
        nested = dataclasses.is_dataclass(item) or (hasattr(item, "items") and len(item) > 0)
        if nested:
            lines.append(_line(indent, key, "", comment))
            lines.extend(_block(item, indent + 1))
        else:
            lines.append(_line(indent, key, "{}" if hasattr(item, "items") else scalar(item), comment))
    return lines


def render(cfg: Config, name: str) -> str:
    """``params.yaml`` for profile ``name``: every section and key, each with its comment."""
    lines = [f"# The single configuration of the pipeline, profile {name!r}: written by `python -m pipeline.profile "
             f"{name}`", "# (defaults: the settings dataclasses, see pipeline/config.py"
             + (f"; overlay: {PROFILES_DIR}/{name}.yaml)." if name != DEFAULT_PROFILE else ")."),
             "# Try a change with `dvc exp run -S key=value`; keep one in a profile overlay or the defaults."]
    comments = field_comments(Config)
    for section in ordered_fields(Config):
        lines.append("")
        lines.append(f"# {comments[section][:1].upper()}{comments[section][1:]}")
        value = getattr(cfg, section)
        if value is None or (hasattr(value, "items") and not value):  # null, or an empty mapping section
            lines.append(f"{section}: {'null' if value is None else '{}'}")
        else:
            lines.extend([f"{section}:", *_block(value, 1)])
    return "\n".join(lines) + "\n"


# --- switching ------------------------------------------------------------------------------------------

def current(root: Path) -> str | None:
    """The profile whose values ``params.yaml`` holds (its comments and layout aside), or None.

    Values, not bytes: a ``params.yaml`` written before a new key was added still counts as its profile
    (the new key takes its default), so switching loses no value.
    """
    params = Path(root) / PARAMS_FILE
    if not params.is_file():
        return None
    try:
        values = parse_config(read_params(params), str(params))
    except (OSError, ValueError):
        return None
    for name in available(root):
        try:
            if profile_config(root, name) == values:
                return name
        except (OSError, ValueError):
            continue
    return None


def check(root: Path, name: str) -> Config:
    """Validate profile ``name`` (errors name the file and the key)."""
    return profile_config(root, name)


def switch(root: Path, name: str, *, force: bool = False) -> Path:
    """Write profile ``name``'s rendering to ``root/params.yaml``; returns the params path."""
    text = render(check(root, name), name)
    params = Path(root) / PARAMS_FILE
    if params.is_file() and not force and current(root) is None:
        raise RuntimeError(
            f"{params} holds values of no profile (edited, or changed by `dvc exp run -S`); save the edits into a "
            f"profile overlay ({PROFILES_DIR}/<name>.yaml) or rerun with --force to overwrite them")
    params.write_text(text)
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.profile", description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", help="profile to switch to (tiny, paper, ...); omit to show the current one")
    ap.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    ap.add_argument("--force", action="store_true", help="overwrite a params.yaml whose values are no profile's")
    ap.add_argument("--check", action="store_true", help="only validate the profile(s), change nothing")
    args = ap.parse_args(argv)
    try:
        if args.check:
            for name in [args.name] if args.name else available(args.root):
                check(args.root, name)
                print(f"profile {name}: ok")
            return 0
        if not args.name:
            print(f"params.yaml = profile {current(args.root)!r} (profiles: {', '.join(available(args.root))})")
            return 0
        params = switch(args.root, args.name, force=args.force)
    except (OSError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{params} <- profile {args.name}")
    if args.name != DEFAULT_PROFILE:
        print("now edit the local paths it names (model.base_path, data.*, score.checkpoints.*); "
              "how to run it: docs/paper_profile.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
