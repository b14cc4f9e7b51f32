"""Import-graph contracts: no import circle, no private name imported across modules.

The graph has one node per module of the installed package (``sparsify_fx``,
``sparsify_fx.passes`` from ``passes/``, ``sparsify_fx.export`` from ``export/``)
and one edge per import statement, at module level or inside a function (a
deferred import still ties the two modules together). Imports under
``if TYPE_CHECKING:`` are left out: they never run. ``from pkg import name``
counts as an import of ``pkg.name`` when that is a module, else of ``pkg``.
"""
from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (pyproject's package-dir)
SOURCES = {"sparsify_fx": "sparsify_fx", "passes": "sparsify_fx.passes",
           "export": "sparsify_fx.export"}


@dataclass(frozen=True)
class ImportSite:
    """One imported name: ``module`` imports ``name`` (None: the whole module) from ``target``."""

    module: str
    target: str
    name: str | None
    line: int


def module_files(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the installed package under ``root``."""
    files = {}
    for folder, package in SOURCES.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_sites(module: str, path: pathlib.Path, known: set[str]) -> list[ImportSite]:
    """Every import of ``module`` that names a module in ``known`` (absolute or relative)."""
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    sites = []
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            sites += [ImportSite(module, a.name, None, node.lineno)
                      for a in node.names if a.name in known]
            continue
        if node.level:
            base = package_parts[:len(package_parts) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target not in known:
            continue
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in known:
                sites.append(ImportSite(module, sub, None, node.lineno))
            else:
                sites.append(ImportSite(module, target, alias.name, node.lineno))
    return sites


def all_sites(root: pathlib.Path = ROOT) -> list[ImportSite]:
    files = module_files(root)
    return [s for m, p in files.items() for s in import_sites(m, p, set(files))]


def import_cycles(sites: list[ImportSite]) -> list[list[str]]:
    """Each import circle (a strongly connected set of two or more modules), sorted."""
    graph = nx.DiGraph((s.module, s.target) for s in sites if s.module != s.target)
    return sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)


def private_imports(sites: list[ImportSite]) -> list[str]:
    """``module:line imports _name from other`` for every single-underscore name taken
    from another module (a private module of the importer's own package is fine)."""
    bad = []
    for s in sites:
        if s.name and s.name.startswith("_") and not s.name.startswith("__"):
            bad.append(f"{s.module}:{s.line} imports {s.name} from {s.target}")
        leaf = s.target.rsplit(".", 1)[-1]
        owner = s.target.rsplit(".", 1)[0]
        if s.name is None and leaf.startswith("_") and not leaf.startswith("__") \
                and not s.module.startswith(owner + "."):
            bad.append(f"{s.module}:{s.line} imports private module {s.target}")
    return bad


def test_package_has_no_import_cycle() -> None:
    cycles = import_cycles(all_sites())
    assert not cycles, "import circles (move the shared piece to the module it belongs to): " \
        + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_name_is_imported_across_modules() -> None:
    bad = private_imports(all_sites())
    assert not bad, "make the name public or move it where it is used: " + "; ".join(bad)


def test_checker_sees_a_cycle_and_a_private_import(tmp_path: pathlib.Path) -> None:
    """The two checks above fail on a new circle (also through a deferred import)
    and on a private import; TYPE_CHECKING imports do not count."""
    pkg = tmp_path / "sparsify_fx"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "passes").mkdir()
    (tmp_path / "export").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import _hidden\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from sparsify_fx import a\n")
    (tmp_path / "passes" / "p.py").write_text("from sparsify_fx.export.e import x\n")
    (tmp_path / "export" / "e.py").write_text("import sparsify_fx.passes.p\n")
    sites = all_sites(tmp_path)
    assert import_cycles(sites) == [["sparsify_fx.a", "sparsify_fx.sub.b"],
                                    ["sparsify_fx.export.e", "sparsify_fx.passes.p"]]
    assert private_imports(sites) == ["sparsify_fx.sub.b:2 imports _hidden from sparsify_fx.a"]
    assert not any(s.module == "sparsify_fx.c" for s in sites)
