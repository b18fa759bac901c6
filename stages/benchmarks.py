"""Stage `benchmarks`: obtain the public evaluation prompt files of ``benchmarks.files``, SHA-256 checked.

From their pinned GitHub addresses (``benchmarks.source: null``) or a mirror folder / URL base, into
``benchmarks.out_dir`` with a ``manifest.json`` (``pipeline.benchmarks``). With ``files: []`` (the tiny
profile) only the empty manifest is written.
"""

from __future__ import annotations

import sys

from pipeline.benchmarks import BenchmarkError, fetch
from stages.common import load

PARAMS = ("benchmarks",)


def main() -> None:
    b = load(PARAMS).benchmarks
    try:
        fetched = fetch(b.files, b.out_dir, b.source)
    except BenchmarkError as err:
        print(f"benchmarks: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"benchmarks: {len(b.files)} file(s) in {b.out_dir} ({len(fetched)} fetched, SHA-256 ok)", flush=True)


if __name__ == "__main__":
    main()
