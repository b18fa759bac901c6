"""Every project source file a stage imports is a dep of that stage in dvc.yaml (so edits rerun it)."""

from __future__ import annotations

import modulefinder
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
MODULE_OF = {"synth": "synth", "prepare": "prepare", "pretrain": "pretrain", "train": "train", "sample": "sample",
             "score": "score", "report": "report", "prompt_files": "prompt_files", "dynamics": "dynamics"}


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


STUDY = yaml.safe_load((ROOT / "study" / "dvc.yaml").read_text())["stages"]  # wdir: the repo root
STUDY_MODULE_OF = {"base": "study", "seed": "study", "sweep": "study", "report": "study_report"}


@pytest.mark.parametrize("stage", sorted(STUDY_MODULE_OF))
def test_study_stage_deps_cover_imported_source(stage):
    spec = STUDY[stage]
    assert spec["wdir"] == ".." and spec["cmd"].startswith(f"python -m stages.{STUDY_MODULE_OF[stage]}")
    assert_deps_cover(f"study/dvc.yaml stage {stage!r}", spec["deps"], STUDY_MODULE_OF[stage])


def assert_deps_cover(label: str, deps: list[str], module: str) -> None:
    deps = [d for d in deps if "${" not in d]
    missing = [f for f in sorted(project_sources(module))
               if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
    assert not missing, f"{label} lacks deps: {missing}"


@pytest.mark.parametrize("stage", sorted(MODULE_OF))
def test_stage_deps_cover_imported_source(stage):
    spec = STAGES[stage].get("do", STAGES[stage])
    assert_deps_cover(f"dvc.yaml stage {stage!r}", spec["deps"], MODULE_OF[stage])
