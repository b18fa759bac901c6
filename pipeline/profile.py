"""Switch the pipeline between configuration profiles: ``python -m pipeline.profile paper|tiny``.

A profile is a complete params file, ``profiles/<name>.yaml``: ``tiny`` (the embedded default,
identical to the shipped ``params.yaml``) and ``paper`` (SD3.5-Medium on 8 GPUs, docs/method.md#paper-defaults).
Switching validates the profile against the schema (``pipeline.config.parse_config``) and copies it
over ``params.yaml`` byte for byte, so switching back restores the file exactly. A ``params.yaml``
that matches no profile holds edits of its own; it is overwritten only with ``--force``.

Paths are relative to ``--root`` (default: the current directory, the repository root).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pipeline.config import parse_config, read_params

PROFILES_DIR = "profiles"
PARAMS_FILE = "params.yaml"


def profile_path(root: Path, name: str) -> Path:
    return Path(root) / PROFILES_DIR / f"{name}.yaml"


def available(root: Path) -> list[str]:
    """Names of the profiles under ``root/profiles``."""
    return sorted(p.stem for p in (Path(root) / PROFILES_DIR).glob("*.yaml"))


def current(root: Path) -> str | None:
    """The profile ``params.yaml`` is a byte-for-byte copy of, or None."""
    params = Path(root) / PARAMS_FILE
    if not params.is_file():
        return None
    data = params.read_bytes()
    return next((n for n in available(root) if profile_path(root, n).read_bytes() == data), None)


def check(root: Path, name: str) -> Path:
    """Validate profile ``name``; returns its path (errors name the file and the key)."""
    path = profile_path(root, name)
    if not path.is_file():
        known = ", ".join(available(root)) or "none"
        raise FileNotFoundError(f"no profile {name!r}: {path} does not exist (profiles: {known})")
    parse_config(read_params(path), str(path))
    return path


def switch(root: Path, name: str, *, force: bool = False) -> Path:
    """Copy profile ``name`` over ``root/params.yaml``; returns the params path."""
    source = check(root, name)
    params = Path(root) / PARAMS_FILE
    if params.is_file() and not force and current(root) is None:
        raise RuntimeError(
            f"{params} matches no profile in {Path(root) / PROFILES_DIR} (edited, or changed by `dvc exp run -S`); "
            f"save the edits into a profile file or rerun with --force to overwrite them")
    shutil.copyfile(source, params)
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.profile", description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", help="profile to switch to (tiny, paper, ...); omit to show the current one")
    ap.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    ap.add_argument("--force", action="store_true", help="overwrite a params.yaml that matches no profile")
    ap.add_argument("--check", action="store_true", help="only validate the profile(s), change nothing")
    args = ap.parse_args(argv)
    try:
        if args.check:
            for name in [args.name] if args.name else available(args.root):
                print(f"{check(args.root, name)}: ok")
            return 0
        if not args.name:
            print(f"params.yaml = profile {current(args.root)!r} (profiles: {', '.join(available(args.root))})")
            return 0
        params = switch(args.root, args.name, force=args.force)
    except (OSError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{params} <- {profile_path(args.root, args.name)}")
    if args.name != "tiny":
        print("now edit the local paths it names (model.base_path, data.*, score.checkpoints.*); "
              "how to run it: docs/paper_profile.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
