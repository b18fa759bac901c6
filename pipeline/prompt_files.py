"""The paper's evaluation prompt files: where each comes from, its SHA-256, and fetching them checked.

``FILES`` names the six public files (described in ``docs/prompt_sets.md``): each by its
relative path under the output folder, with the source repository @ commit, the path there, the raw
GitHub address, the SHA-256, the count of non-empty lines and the licence. ``fetch`` obtains a chosen
subset from the public addresses (``source=None``) or from a mirror laid out like the output folder
(a local folder, or an ``http(s)://`` / ``file://`` base), verifies hash and line count before anything
is written, writes each file atomically (``soar.atomic``) and a ``manifest.json`` beside them.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from soar import atomic

RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"  # GitHub's raw-file pattern
MANIFEST = "manifest.json"  # in the output folder: a list of {name, source, sha256, lines}, one per file

DIFFUSIONNFT_REPO = "NVlabs/DiffusionNFT"  # holds Flow-GRPO's test sets (same files in yifan123/flow_grpo)
DIFFUSIONNFT_COMMIT = "24af5554898d85e93efa492f42b5e9cdf4156e9b"
DIFFUSIONNFT_LICENCE = "Apache-2.0 (DiffusionNFT; the same file in yifan123/flow_grpo is MIT)"
GENEVAL_REPO = "djghosh13/geneval"  # the official GenEval prompt list
GENEVAL_COMMIT = "af4902f24d3ca90ebbb446dd9891a59e0f82725f"
GENEVAL_LICENCE = "MIT"


class PromptFileError(RuntimeError):
    """A prompt file could not be obtained, or its content is not the published one."""


@dataclass(frozen=True)
class PromptFile:
    """One public prompt file, pinned to a commit and a SHA-256."""

    name: str  # relative path under the output folder (and under a mirror)
    repo: str  # source GitHub repository, owner/name
    commit: str  # commit the file is pinned to
    path: str  # path of the file in the source repository
    sha256: str  # hex SHA-256 of the exact bytes
    lines: int  # non-empty lines (the files have no trailing newline)
    licence: str  # licence of the source repository

    @property
    def url(self) -> str:
        """The public raw address of the pinned file."""
        return RAW_URL.format(repo=self.repo, commit=self.commit, path=self.path)


def _nft(name: str, sha256: str, lines: int) -> PromptFile:
    path = "dataset/" + name.removeprefix("flowgrpo/")
    return PromptFile(name, DIFFUSIONNFT_REPO, DIFFUSIONNFT_COMMIT, path, sha256, lines, DIFFUSIONNFT_LICENCE)


def _geneval(name: str, sha256: str, lines: int) -> PromptFile:
    path = "prompts/" + name.removeprefix("geneval/")
    return PromptFile(name, GENEVAL_REPO, GENEVAL_COMMIT, path, sha256, lines, GENEVAL_LICENCE)


FILES: dict[str, PromptFile] = {f.name: f for f in (
    _nft("flowgrpo/geneval/test_metadata.jsonl",  # 553 GenEval prompts x 4, metadata JSONL
         "cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28", 2212),
    _nft("flowgrpo/ocr/test.txt", "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc", 1018),
    _nft("flowgrpo/drawbench/test.txt",  # 200 DrawBench prompts x 5
         "9006b98feabb94b28a2bc0c88de42fd4f31a9ec3c2a19e308a02c5385b7172f0", 1000),
    _nft("flowgrpo/pickscore/test.txt", "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262", 2048),
    _geneval("geneval/evaluation_metadata.jsonl",  # the official 553-prompt GenEval list
             "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13", 553),
    _geneval("geneval/object_names.txt", "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd", 80),
)}


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def count_lines(data: bytes) -> int:
    """Non-empty lines of ``data`` (a missing final newline is fine)."""
    return sum(1 for line in data.splitlines() if line.strip())


def location(entry: PromptFile, source: str | None) -> str:
    """Where ``entry`` is read from: its public URL, ``<url base>/<name>`` or ``<mirror folder>/<name>``."""
    if source is None:
        return entry.url
    if source.startswith(("http://", "https://", "file://")):
        return f"{source.rstrip('/')}/{entry.name}"
    return str(Path(source) / entry.name)


def _read(entry: PromptFile, where: str, timeout: float) -> bytes:
    if "://" not in where:
        try:
            return Path(where).read_bytes()
        except OSError as err:
            raise PromptFileError(f"{entry.name}: cannot read mirror file {where}: {err.strerror or err}") from None
    try:
        with urllib.request.urlopen(where, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        raise PromptFileError(f"{entry.name}: cannot fetch {where}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise PromptFileError(f"{entry.name}: cannot fetch {where}: {reason}") from None


def check(entry: PromptFile, data: bytes, where: str) -> None:
    """Raise ``PromptFileError`` naming file, origin and both values unless ``data`` is the published file."""
    actual = sha256_of(data)
    if actual != entry.sha256:
        raise PromptFileError(f"{entry.name} from {where}: SHA-256 mismatch: expected {entry.sha256}, got {actual}")
    lines = count_lines(data)
    if lines != entry.lines:
        raise PromptFileError(f"{entry.name} from {where}: expected {entry.lines} non-empty lines, got {lines}")


def _is_published(entry: PromptFile, path: Path) -> bool:
    return path.is_file() and sha256_of(path.read_bytes()) == entry.sha256


def fetch(names: Iterable[str], out_dir: str | Path, source: str | None = None, *, timeout: float = 60.0,
          log: Callable[[str], None] = print) -> list[str]:
    """Obtain files ``names`` of ``FILES`` into ``out_dir`` and write its manifest; returns the names fetched.

    A file already in ``out_dir`` with the published SHA-256 is kept, not fetched again; one with another
    hash is removed and fetched. A file whose bytes differ from the table raises ``PromptFileError``
    before anything is written for it.
    """
    names = list(names)
    unknown = [n for n in names if n not in FILES]
    if unknown:
        raise PromptFileError(f"unknown prompt file {unknown[0]!r} (known: {', '.join(FILES)})")
    out_dir = Path(out_dir)
    fetched, manifest = [], []
    for name in names:
        entry, dest = FILES[name], out_dir / name
        where = location(entry, source)
        if _is_published(entry, dest):
            log(f"prompt_files: {name} present, SHA-256 ok")
        else:
            if dest.exists():
                log(f"prompt_files: {dest} has another SHA-256; fetching it again")
                dest.unlink()
            data = _read(entry, where, timeout)
            check(entry, data, where)
            atomic.write_bytes(dest, data)
            fetched.append(name)
            log(f"prompt_files: {name} <- {where} ({entry.lines} lines, SHA-256 ok)")
        manifest.append({"name": name, "source": where, "sha256": entry.sha256, "lines": entry.lines})
    atomic.write_bytes(out_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return fetched
