"""The method and prompt-file docs stay in step with the code: cited sections exist, the file table matches."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.prompt_files import FILES

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
PROMPT_SETS = ROOT / "docs" / "prompt_sets.md"
SKIP_DIRS = {".git", ".dvc", "data", ".venv", "venv", "__pycache__", "mlruns", "mlartifacts", "build"}
SUFFIXES = {".py", ".md", ".yaml", ".sh", ".sbatch", ".toml"}


def anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(m) for m in re.findall(r"^#{1,6} (.+)$", path.read_text(), re.M)}


def project_files() -> list[Path]:
    return [p for p in ROOT.rglob("*") if p.suffix in SUFFIXES and p.is_file()
            and not SKIP_DIRS.intersection(p.relative_to(ROOT).parts) and not p.name.endswith(".egg-info")]


def test_every_cited_method_section_exists():
    known = anchors(METHOD)
    cited = {}
    for path in project_files():
        text = path.read_text(errors="replace")
        for name in re.findall(r"method\.md#([\w-]+)", text):
            cited.setdefault(name, path.relative_to(ROOT))
        if path == METHOD:
            for name in re.findall(r"\]\(#([\w-]+)\)", text):
                cited.setdefault(name, path.relative_to(ROOT))
    assert cited, "no file cites a section of docs/method.md"
    missing = {name: str(where) for name, where in cited.items() if name not in known}
    assert not missing, f"cited sections missing from docs/method.md (anchor: first file citing it): {missing}"


def test_training_steps_are_numbered_one_to_six():
    steps = re.findall(r"^### Step (\d): ", METHOD.read_text(), re.M)
    assert steps == [str(i) for i in range(1, 7)]


def test_prompt_sets_table_matches_the_fetch_table():
    rows = re.findall(r"^\| (\S+) \| (\S+) @ ([0-9a-f]{40}) \| (\S+) \| (\d+) \| `([0-9a-f]{64})` \|$",
                      PROMPT_SETS.read_text(), re.M)
    table = {name: (repo, commit, path, int(lines), sha) for name, repo, commit, path, lines, sha in rows}
    assert table == {name: (f.repo, f.commit, f.path, f.lines, f.sha256) for name, f in FILES.items()}


def test_every_local_link_and_picture_of_the_markdown_files_exists():
    broken = []
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[\w-]*)?\)", path.read_text()):
            if not target.startswith(("http://", "https://")) and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken
