"""Every stage of dvc.yaml and study/dvc.yaml lists exactly the project source files it runs (so edits rerun it
and nothing else does), as ``python -m pipeline.deps`` derives them from each stage's ``cmd``, and the prompt
files a profile evaluates on lie under a path the sampling stages depend on."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline import deps

ROOT = Path(__file__).resolve().parents[1]
STAGES = deps.all_stages()


@pytest.mark.parametrize("stage", STAGES, ids=[s.label for s in STAGES])
def test_stage_deps_are_the_sources_it_runs(stage):
    assert deps.cmd_entries(stage.cmd), f"{stage.label}: no project module in {stage.cmd!r}"
    missing, stale = deps.problems(stage)
    assert not missing and not stale, (f"{stage.label}: missing {missing}, stale {stale}; "
                                       f"run `python -m pipeline.deps --write`")


def test_both_pipelines_and_every_stage_are_checked():
    names = {s.label for s in STAGES}
    for dvcfile in deps.DVC_FILES:
        for name in yaml.safe_load((ROOT / dvcfile).read_text())["stages"]:
            assert f"{dvcfile}:{name}" in names
    assert {"dvc.yaml:embed", "dvc.yaml:train", "study/dvc.yaml:seed", "study/dvc.yaml:sweep"} <= names


def test_registry_scorers_reach_only_the_stages_that_build_scorers():
    by_label = {s.label: set(deps.expected(s)) for s in STAGES}
    scorers = {str(deps.module_file(m).relative_to(ROOT)) for m in deps.registry_modules()}
    assert scorers and {"build_scorer", "available"} <= deps.registry_lookups()
    for label in ("dvc.yaml:score", "dvc.yaml:prepare", "dvc.yaml:dynamics", "study/dvc.yaml:base"):
        assert scorers <= by_label[label], label
    assert not scorers & by_label["dvc.yaml:synth"]  # it imports the rule engine, never the registry's lookup


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_closure_follows_every_kind_of_import(tmp_path):
    _tree(tmp_path, {
        "stages/__init__.py": "",
        "stages/run.py": """
            from typing import TYPE_CHECKING
            import numpy
            from pipeline import tool
            from . import helper
            if TYPE_CHECKING:
                from soar import typing_only
            def main():
                import soar.lazy.deep
            """,
        "stages/helper.py": "",
        "pipeline/__init__.py": '"""Docstring only."""\n',
        "pipeline/tool.py": "from soar.rewards import base\nx = base.build_scorer('a')\n",
        "soar/__init__.py": "",
        "soar/typing_only.py": "",
        "soar/lazy/__init__.py": "VALUE = 1\n",
        "soar/lazy/deep.py": "from .sibling import name\nfrom .. import other\n",
        "soar/other.py": "",
        "soar/lazy/sibling.py": "name = 1\n",
        "soar/lazy/font.ttf": "",
        "soar/rewards/__init__.py": "",
        "soar/rewards/base.py": """
            BUILTIN_SCORER_MODULES = ("soar.rewards.one",)
            def _load():
                for m in BUILTIN_SCORER_MODULES:
                    pass
            def build_scorer(name):
                _load()
            """,
        "soar/rewards/one.py": "",
    })
    files = {p.relative_to(tmp_path).as_posix() for p in deps.closure(["stages.run"], tmp_path)}
    assert files == {"stages/run.py", "stages/helper.py", "pipeline/tool.py", "soar/lazy/__init__.py",
                     "soar/lazy/deep.py", "soar/lazy/sibling.py", "soar/lazy/font.ttf", "soar/other.py",
                     "soar/rewards/base.py", "soar/rewards/one.py"}


DVC_YAML = """\
# a comment kept
stages:
  one:
    cmd: python -m stages.run
    deps:  # the sources, then data
      - stages/run.py
      - soar
      - data/input  # data stays
      - pipeline/gone.py
    outs:
      - out
  two:
    foreach: [a, b]
    do:
      wdir: sub
      cmd: accelerate launch --config_file x.yaml -m stages.run ${item}
      deps:
        - ${data.dir}
        - ../stages/run.py
  three:
    cmd: python -m stages.run
    deps: &shared
      - stages/run.py
  four:
    cmd: python -m stages.run again
    deps: *shared
"""
WRITTEN = (DVC_YAML.replace("      - soar\n", "      - soar/used.py\n").replace("      - pipeline/gone.py\n", "")
           .replace("        - ../stages/run.py\n", "        - ../stages/run.py\n        - ../soar/used.py\n")
           .replace("&shared\n      - stages/run.py\n", "&shared\n      - stages/run.py\n      - soar/used.py\n"))


def test_write_rewrites_only_source_entries_and_is_idempotent(tmp_path):
    _tree(tmp_path, {"stages/__init__.py": "", "stages/run.py": "from soar import used\n", "stages/other.py": "",
                     "soar/__init__.py": "", "soar/used.py": "", "soar/unused.py": "", "pipeline/__init__.py": ""})
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    assert len(deps.check(tmp_path)) == 4
    assert deps.write(tmp_path) == [tmp_path / "dvc.yaml"]
    assert (tmp_path / "dvc.yaml").read_text() == WRITTEN
    assert deps.check(tmp_path) == [] and deps.write(tmp_path) == []
    (tmp_path / "dvc.yaml").write_text(DVC_YAML.replace("stages.run again", "stages.other"))
    with pytest.raises(ValueError, match="share one deps list"):
        deps.write(tmp_path)


def _resolve(template: str, params: dict) -> str | None:
    """``${a.b}/c`` with the value of a.b in ``params``; None when a name is not a params key (``${item}``)."""
    out = template
    while "${" in out:
        start = out.index("${")
        end = out.index("}", start)
        node = params
        for part in out[start + 2:end].split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        out = out[:start] + str(node) + out[end + 1:]
    return out


def _profile(name: str) -> dict:
    """The full params of a profile: the params.yaml that ``python -m pipeline.profile <name>`` writes."""
    from pipeline import profile

    return yaml.safe_load(profile.render(profile.profile_config(ROOT, name), name))


SAMPLING_STAGES = ("dvc.yaml:sample", "dvc.yaml:dynamics", "study/dvc.yaml:base", "study/dvc.yaml:seed",
                   "study/dvc.yaml:sweep")


@pytest.mark.parametrize("profile", ["params.yaml", "paper"])
def test_prompt_sets_lie_under_the_sampling_stages_deps(profile):
    params = yaml.safe_load((ROOT / "params.yaml").read_text()) if profile == "params.yaml" else _profile(profile)
    paths = [s["path"] for s in params["sample"]["prompt_sets"].values()]
    assert paths
    for stage in (s for s in STAGES if s.label in SAMPLING_STAGES):
        under = [Path(r) for r in (_resolve(d, params) for d in stage.listed()) if r is not None]
        for path in paths:
            assert any(Path(path) == d or d in Path(path).parents for d in under), \
                f"{stage.label} does not depend on {path} ({profile}); add its folder to the stage's deps"
