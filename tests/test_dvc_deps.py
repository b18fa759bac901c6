"""Every project source file a stage imports is a dep of that stage in dvc.yaml (so edits rerun it)."""

from __future__ import annotations

import modulefinder
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
MODULE_OF = {"synth": "synth", "prepare": "prepare", "pretrain": "pretrain", "train": "train", "sample": "sample",
             "score": "score", "report": "report"}


def project_sources(stage_module: str) -> set[str]:
    """Repo-relative paths of the project files that ``stages/<module>.py`` imports, transitively."""
    finder = modulefinder.ModuleFinder(path=[str(ROOT)], excludes=["torch", "diffusers", "transformers", "mlflow",
                                                                     "accelerate", "numpy", "PIL", "tokenizers"])
    finder.run_script(str(ROOT / "stages" / f"{stage_module}.py"))
    files = set()
    for mod in finder.modules.values():
        path = getattr(mod, "__file__", None)
        if path and Path(path).resolve().is_relative_to(ROOT) and Path(path).name != "__init__.py":
            files.add(str(Path(path).resolve().relative_to(ROOT)))
    files.add(f"stages/{stage_module}.py")
    return files


@pytest.mark.parametrize("stage", sorted(MODULE_OF))
def test_stage_deps_cover_imported_source(stage):
    spec = STAGES[stage].get("do", STAGES[stage])
    deps = [d for d in spec["deps"] if "${" not in d]
    missing = [f for f in sorted(project_sources(MODULE_OF[stage]))
               if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps: {missing}"
