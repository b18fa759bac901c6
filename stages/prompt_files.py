"""Stage `prompt_files`: obtain the public evaluation prompt files of ``prompt_files.files``, SHA-256 checked.

From their pinned GitHub addresses (``prompt_files.source: null``) or a mirror folder / URL base, into
``prompt_files.out_dir`` with a ``manifest.json`` (``pipeline.prompt_files``). With ``files: []`` (the tiny
profile) only the empty manifest is written.
"""

from __future__ import annotations

import sys

from pipeline.prompt_files import PromptFileError, fetch
from stages.common import load, run_main

PARAMS = ("prompt_files",)


def main() -> None:
    b = load(PARAMS).prompt_files
    try:
        fetched = fetch(b.files, b.out_dir, b.source)
    except PromptFileError as err:
        print(f"prompt_files: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"prompt_files: {len(b.files)} file(s) in {b.out_dir} ({len(fetched)} fetched, SHA-256 ok)", flush=True)


if __name__ == "__main__":
    run_main("prompt_files", main)
