"""The project source files each DVC stage runs, derived from the code: ``python -m pipeline.deps [--write]``.

A stage's sources are the project modules its ``cmd`` runs (``python -m stages.X``, ``accelerate launch ...
-m stages.X``, ``python path/to/script.py``) and everything they import, transitively, read from the source
by ``ast``: module-level and function-level (lazy) imports, ``import a.b``, ``from a import b`` where ``b``
is a module, relative imports; imports under ``if TYPE_CHECKING:`` never run and are skipped. Two kinds of
run-time dependency an import statement does not show are added by rule:

- the scorer registry (``soar/rewards/base.py``) imports the modules named in its ``BUILTIN_SCORER_MODULES``
  on first lookup, so a module that calls one of the registry functions that do the lookup
  (``build_scorer``, ``available``: found as the functions calling the loader) also needs those modules;
- non-Python files under ``soar/`` (fonts, data tables: none today, the renderers use Pillow's built-in
  font) are read next to the code, so a module needs every such file of its own package directory.

An ``__init__.py`` is a source when it holds code beyond a docstring (it runs on every import of its
package; ``soar/rewards/__init__.py`` does), and is left out when empty.

Entries are files, never folders: a folder dep reruns a stage for an edit to any file in it, imported or
not (``synth`` runs ``soar/rewards/geneval_rules.py``; the folder would rerun it for an OCR edit), and hides
which files a stage runs, so a stale entry could never be noticed. The price, a new module appears in no
stage until it is imported and the lists are regenerated, is exactly the check this module makes.

``python -m pipeline.deps`` prints one line per stage whose deps lack a source (missing) or list a source
file or package folder it does not run (stale) and exits 1; ``--write`` rewrites those stages' source
entries in dvc.yaml and study/dvc.yaml in place: the rest of the file (comments, anchors, other deps and
their order) is left as it is, the sources go where the first one was, the entry modules first and the
rest sorted. A second ``--write`` changes nothing. The tests (tests/test_dvc_deps.py) run the check.
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC_FILES = ("dvc.yaml", "study/dvc.yaml")
PACKAGES = ("pipeline", "soar", "stages")  # the project's top-level packages: every other import is external
DATA_ROOTS = ("soar",)  # non-Python files under these are package data read at run time
REGISTRY = ("soar.rewards.base", "BUILTIN_SCORER_MODULES")  # module, and its tuple of dynamically imported modules


# --- modules and their imports -------------------------------------------------------------------------------

def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of project module ``name`` (``a.b`` -> a/b.py or a/b/__init__.py), or None when external."""
    parts = name.split(".")
    if not parts or parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend([node.test, *node.orelse])
        else:
            stack.extend(ast.iter_child_nodes(node))


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for an expression that is a chain of names, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``[a, a.b, a.b.c]``: importing a module runs its packages' ``__init__`` first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@dataclass
class Module:
    """What one project module needs at run time: the modules it imports and the registry calls it makes."""

    path: Path
    imports: set[str] = field(default_factory=set)
    calls_registry: bool = False


@cache
def parse_module(path: Path, root: Path = ROOT) -> Module:
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found = Module(path)
    registry_paths = {REGISTRY[0], REGISTRY[0].rpartition(".")[0]}  # the registry module and its package
    registry_names: set[str] = set()  # local names bound to a registry lookup function
    registry_aliases = set(registry_paths)  # dotted names bound to the registry module or its package
    lookups = registry_lookups(root)
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.imports.update(_with_parents(alias.name))
                if alias.asname and alias.name in registry_paths:
                    registry_aliases.add(alias.asname)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.imports.update(_with_parents(source))
            for alias in node.names:
                child = f"{source}.{alias.name}"
                if module_file(child, root) is not None:
                    found.imports.add(child)
                    if child in registry_paths:
                        registry_aliases.add(alias.asname or alias.name)
                elif source in registry_paths and alias.name in lookups:
                    registry_names.add(alias.asname or alias.name)
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Call):
            func = node.func
            by_name = isinstance(func, ast.Name) and func.id in registry_names
            by_attribute = isinstance(func, ast.Attribute) and func.attr in lookups and _dotted(
                func.value) in registry_aliases
            if by_name or by_attribute:
                found.calls_registry = True
    found.imports = {m for m in found.imports if module_file(m, root) is not None}
    return found


@cache
def registry_modules(root: Path = ROOT) -> tuple[str, ...]:
    """The modules the scorer registry imports by name (its ``BUILTIN_SCORER_MODULES``), read from the source."""
    module, constant = REGISTRY
    if module_file(module, root) is None:
        return ()
    tree = ast.parse(module_file(module, root).read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == constant for t in targets):
            return tuple(ast.literal_eval(node.value))
    raise LookupError(f"{module}: no {constant}")


@cache
def registry_lookups(root: Path = ROOT) -> frozenset[str]:
    """The registry's functions that import the scorer modules: the loader (the function that reads
    ``BUILTIN_SCORER_MODULES``) and every top-level function that calls it."""
    module, constant = REGISTRY
    if module_file(module, root) is None:
        return frozenset()
    tree = ast.parse(module_file(module, root).read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    loaders = {f.name for f in functions
               if any(isinstance(n, ast.Name) and n.id == constant for n in ast.walk(f))}
    return frozenset(loaders | {f.name for f in functions if any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in loaders for n in ast.walk(f))})


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return bool(body)


def package_data(path: Path, root: Path = ROOT) -> set[Path]:
    """Non-Python files under ``DATA_ROOTS`` whose nearest package directory is ``path``'s."""
    if path.relative_to(root).parts[0] not in DATA_ROOTS:
        return set()
    files = set()
    for dirpath, dirnames, filenames in os.walk(path.parent):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not (here / d / "__init__.py").exists()]
        files.update(here / f for f in filenames if not f.endswith((".py", ".pyc")))
    return files


def closure(modules: list[str], root: Path = ROOT) -> set[Path]:
    """The project files that running ``modules`` needs: modules, their imports, registry scorers, data."""
    seen: set[str] = set()
    todo = [m for name in modules for m in _with_parents(name) if module_file(m, root) is not None]
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, root)
        mod = parse_module(path, root)
        if path.name != "__init__.py" or _has_code(path):
            files.add(path)
        files |= package_data(path, root)
        todo.extend(mod.imports)
        if mod.calls_registry:
            todo.extend(m for r in registry_modules(root) for m in _with_parents(r))
    return files


# --- stages ---------------------------------------------------------------------------------------------------

def cmd_entries(cmd: str | list[str], root: Path = ROOT) -> list[str]:
    """The project modules a stage command runs: every ``-m MODULE`` and ``python FILE.py`` in it."""
    entries = []
    for line in [cmd] if isinstance(cmd, str) else cmd:
        tokens = shlex.split(line)
        for i, token in enumerate(tokens):
            if token == "-m" and i + 1 < len(tokens) and module_file(tokens[i + 1], root) is not None:
                entries.append(tokens[i + 1])
            elif token.endswith(".py") and (root / token).is_file():
                entries.append(module_name(root / token, root))
    return entries


@dataclass
class Stage:
    """One stage of a dvc.yaml (a foreach/matrix stage is one stage: its ``do`` body is shared)."""

    dvcfile: Path
    file: str  # the dvc.yaml's path relative to the project root, for messages
    name: str
    cmd: str | list[str]
    wdir: Path
    deps: yaml.SequenceNode | None  # the composed node: stages sharing an anchored list share the node

    @property
    def label(self) -> str:
        return f"{self.file}:{self.name}"

    def listed(self) -> list[str]:
        return [n.value for n in self.deps.value if isinstance(n, yaml.ScalarNode)] if self.deps else []


def _get(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    return next((v for k, v in node.value if k.value == key), None)


def read_stages(dvcfile: Path, root: Path = ROOT) -> list[Stage]:
    """The stages of ``dvcfile``, with their deps as composed YAML nodes (lines and columns kept)."""
    root_node = yaml.compose(dvcfile.read_text(), Loader=yaml.SafeLoader)
    stages = []
    for key, spec in _get(root_node, "stages").value:
        body = _get(spec, "do") or spec
        cmd = yaml.safe_load(yaml.serialize(_get(body, "cmd") or _get(spec, "cmd")))
        wdir_node = _get(body, "wdir") or _get(spec, "wdir")
        wdir = (dvcfile.parent / (wdir_node.value if wdir_node else ".")).resolve()
        deps = _get(body, "deps")
        deps = deps if isinstance(deps, yaml.SequenceNode) else None
        stages.append(Stage(dvcfile, dvcfile.relative_to(root).as_posix(), key.value, cmd, wdir, deps))
    return stages


def all_stages(root: Path = ROOT) -> list[Stage]:
    return [s for f in DVC_FILES if (root / f).is_file() for s in read_stages(root / f, root)]


def is_source_entry(entry: str, wdir: Path, root: Path = ROOT) -> bool:
    """A dep this module owns: a project ``.py`` file, a project package folder, or package data."""
    if "${" in entry:
        return False
    path = (wdir / entry).resolve()
    if not path.is_relative_to(root) or path == root:
        return False
    top = path.relative_to(root).parts[0]
    if top not in PACKAGES:
        return False
    return path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").is_file()) or top in DATA_ROOTS


def expected(stage: Stage, root: Path = ROOT) -> list[str]:
    """The stage's source entries, relative to its wdir: the entry modules' files first, then the other files
    of their package (``stages/common.py``), then the rest, each group sorted."""
    entries = cmd_entries(stage.cmd, root)
    first = list(dict.fromkeys(module_file(m, root) for m in entries))
    tops = {f.relative_to(root).parts[0] for f in first}
    rest = sorted(closure(entries, root) - set(first),
                  key=lambda f: (f.relative_to(root).parts[0] not in tops, f.relative_to(root).as_posix()))
    return [Path(os.path.relpath(f, stage.wdir)).as_posix() for f in first + rest]


def problems(stage: Stage, root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(missing, stale) source entries of ``stage``."""
    want = expected(stage, root)
    have = [e for e in stage.listed() if is_source_entry(e, stage.wdir, root)]
    return [e for e in want if e not in have], [e for e in have if e not in want]


def check(root: Path = ROOT) -> list[str]:
    """One line per stage whose source deps differ from what its command runs; empty when all are right."""
    lines = []
    for stage in all_stages(root):
        if not cmd_entries(stage.cmd, root):
            lines.append(f"{stage.label}: no project module in cmd {stage.cmd!r}")
            continue
        missing, stale = problems(stage, root)
        if missing or stale:
            lines.append(f"{stage.label}: missing {', '.join(missing) or '-'}; stale {', '.join(stale) or '-'}")
    return lines


def write(root: Path = ROOT) -> list[Path]:
    """Rewrite the source entries of every stage that needs it, in place; returns the files changed."""
    changed = []
    for dvcfile in [root / f for f in DVC_FILES if (root / f).is_file()]:
        by_node: dict[int, list[Stage]] = {}
        for stage in read_stages(dvcfile, root):
            if stage.deps is not None and cmd_entries(stage.cmd, root):
                by_node.setdefault(id(stage.deps), []).append(stage)
        lines = dvcfile.read_text().splitlines(keepends=True)
        edits = []
        for stages in by_node.values():
            wants = {tuple(expected(s, root)) for s in stages}
            if len(wants) > 1:  # an anchored list shared by stages that run different code
                raise ValueError(f"{', '.join(s.label for s in stages)} share one deps list but need different "
                                 f"sources; give them their own lists")
            stage = stages[0]
            if problems(stage, root) != ([], []):
                edits.append((stage, list(wants.pop())))
        for stage, want in sorted(edits, key=lambda e: -e[0].deps.start_mark.line):
            _rewrite(lines, stage, want, root)
        if edits:
            dvcfile.write_text("".join(lines))
            changed.append(dvcfile)
    return changed


def _rewrite(lines: list[str], stage: Stage, want: list[str], root: Path) -> None:
    """Replace the source items of ``stage``'s block-style deps list in ``lines`` by ``want``."""
    node = stage.deps
    if node.flow_style:
        raise ValueError(f"{stage.label}: deps is a flow-style list; write it as a block list")
    items = [(n.start_mark.line, n.value) for n in node.value if isinstance(n, yaml.ScalarNode)]
    source_lines = [line for line, value in items if is_source_entry(value, stage.wdir, root)]
    first = source_lines[0] if source_lines else items[0][0]
    sample = lines[first]
    prefix = sample[: len(sample) - len(sample.lstrip(" "))] + "- "
    new = [f"{prefix}{entry}\n" for entry in want]
    for line in sorted(source_lines, reverse=True):
        del lines[line]
    lines[first:first] = new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.deps", description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the source deps of dvc.yaml and study/dvc.yaml")
    args = parser.parse_args(argv)
    if args.write:
        for path in write():
            print(f"rewrote {path.relative_to(ROOT)}")
    lines = check()
    for line in lines:
        print(line)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
