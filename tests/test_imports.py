"""The package's import graph: no cycle between its modules, and no module imported inside a
function body except where that is the point: a module that needs an optional dependency (the
Triton kernels), a compiled extension, and the command line's own modules that bring in torch
(``ctm --help`` answers without it).

Read from the source (``ast``), so a hidden import in a rarely run function counts as much as
one at the top of a file."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import ctm_kernels

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads the installed metadata instead
    tomllib = None

PACKAGE = Path(ctm_kernels.__file__).resolve().parent
ROOT = PACKAGE.parent
# the command line imports what needs torch only once a command runs
TORCH_FREE_START = {"ctm_kernels.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").is_file()


def _source(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _is_module(name: str) -> bool:
    """A module of the package: a source file, or a compiled extension next to them."""
    if _source(name) is not None:
        return True
    base = ROOT / Path(*name.split("."))
    return any(base.parent.glob(base.name + ".*.so")) or any(base.parent.glob(base.name + ".*.pyd"))


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


class _Imports(ast.NodeVisitor):
    """Every import of one file: ``(target, line, inside a function)``; targets are full module
    names (``ctm_kernels.io.adapter``) or the top name of another distribution (``torch``)."""

    def __init__(self, module: str, package: str):
        self.module, self.package = module, package
        self.found: list[tuple[str, int, bool]] = []
        self.depth = 0

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node):
        if not _type_checking(node):
            self.generic_visit(node)

    def visit_Import(self, node):
        for a in node.names:
            name = a.name if a.name.startswith("ctm_kernels") else a.name.split(".")[0]
            self.found.append((name, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - node.level + 1]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        if not mod.startswith("ctm_kernels"):
            self.found.append((mod.split(".")[0], node.lineno, self.depth > 0))
            return
        for a in node.names:
            sub = f"{mod}.{a.name}"
            self.found.append((sub if _is_module(sub) else mod, node.lineno, self.depth > 0))


def imports() -> dict[str, list[tuple[str, int, bool]]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        v = _Imports(name, package)
        v.visit(ast.parse(path.read_text(), str(path)))
        out[name] = v.found
    return out


def optional_dependencies() -> set[str]:
    """Top-level import names of the distributions only an extra installs (pyproject.toml)."""
    names = lambda reqs: {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("-", "_") for r in reqs}
    if tomllib is None:       # the installed distribution's requirements, extras marked
        import importlib.metadata

        reqs = importlib.metadata.requires("ctm_kernels") or []
        core = names(r for r in reqs if "extra ==" not in r)
        return names(r for r in reqs if "extra ==" in r) - core
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = names(project.get("dependencies", []))
    return {n for extra in project.get("optional-dependencies", {}).values() for n in names(extra)} - core


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one module (or a module
    importing itself)."""
    found, seen = [], set()
    for start in sorted(edges):
        if start in seen:
            continue
        # a depth-first walk from start; a module is walked once (a second way to it leads
        # where the first did)
        stack, path, visited = [(start, iter(sorted(edges.get(start, ()))))], [start], {start}
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                path.pop()
                continue
            if nxt == start:
                cyc = path + [start]
                if not seen.intersection(cyc[:-1]):
                    found.append(cyc)
                seen.update(cyc)
                continue
            if nxt not in visited and nxt in edges:
                stack.append((nxt, iter(sorted(edges[nxt]))))
                path.append(nxt)
                visited.add(nxt)
    return found


def _graph(found, functions: bool) -> dict[str, set[str]]:
    return {m: {t for t, _, in_fn in imps if t.startswith("ctm_kernels") and (functions or not in_fn)}
            for m, imps in found.items()}


def _reaches(edges_all: dict[str, list], start: str, targets: set[str]) -> bool:
    """Does ``start`` import one of ``targets`` (other distributions), directly or through the
    package's modules, at module level?"""
    todo, seen = [start], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for t, _, in_fn in edges_all.get(m, ()):
            if in_fn:
                continue
            if t in targets:
                return True
            if t.startswith("ctm_kernels"):
                todo.append(t)
    return False


def test_the_package_has_no_import_cycle():
    found = imports()
    assert "ctm_kernels.pipeline.plan" in found and "ctm_kernels.io.adapter" in found
    bad = cycles(_graph(found, functions=True))
    assert not bad, "import cycles: " + "; ".join(" -> ".join(c) for c in bad)


def test_no_function_imports_its_own_package_but_for_a_reason():
    found = imports()
    optional = optional_dependencies()
    assert "triton" in optional and "torch" not in optional
    bad = []
    for module, imps in found.items():
        for target, line, in_function in imps:
            if not in_function or not target.startswith("ctm_kernels"):
                continue
            if _source(target) is None:                             # a compiled extension
                continue
            if _reaches(found, target, optional):                   # needs an optional dependency
                continue
            if module in TORCH_FREE_START and _reaches(found, target, {"torch"}):
                continue
            bad.append(f"{module}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def _check(files: dict[str, str]):
    """The two checks above on a made-up package of ``files`` (module name -> source)."""
    found = {}
    for name, text in files.items():
        package = name if name.endswith("__init__") else name.rpartition(".")[0]
        v = _Imports(name, package.removesuffix(".__init__"))
        v.visit(ast.parse(text))
        found[name] = v.found
    return found


def test_the_checks_see_a_cycle_hidden_in_a_function():
    found = _check({
        "ctm_kernels.pipeline.plan": "from .write import x\n",
        "ctm_kernels.pipeline.write": "from .ranks import y\n",
        "ctm_kernels.pipeline.ranks": "def f():\n    from .plan import z\n",
    })
    assert cycles(_graph(found, functions=True)) == [
        ["ctm_kernels.pipeline.plan", "ctm_kernels.pipeline.write", "ctm_kernels.pipeline.ranks",
         "ctm_kernels.pipeline.plan"]]
    assert cycles(_graph(found, functions=False)) == []
    assert found["ctm_kernels.pipeline.ranks"] == [("ctm_kernels.pipeline.plan", 2, True)]


def test_the_checks_skip_type_checking_blocks_and_read_relative_imports():
    found = _check({"ctm_kernels.io.kohya": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                            "    from ..pipeline import plan\nfrom .adapter import a\nimport torch\n"})
    assert found["ctm_kernels.io.kohya"] == [("typing", 1, False), ("ctm_kernels.io.adapter", 4, False),
                                             ("torch", 5, False)]
