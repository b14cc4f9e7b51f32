"""Package layout contracts: install names and the one-way data path."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_passes_never_import_export() -> None:
    offenders = [f"{p.name}: {name}" for p in sorted((ROOT / "passes").rglob("*.py"))
                 for name in _imports(p)
                 if name.startswith(("sparsify_fx.export", "..export", "export"))]
    assert not offenders, offenders


def test_passes_never_import_prepare() -> None:
    """Passes run inside transform: they read the config from sparsify_fx.config, never
    from sparsify_fx.prepare (which imports the passes)."""
    offenders = [f"{p.name}: {name}" for p in sorted((ROOT / "passes").rglob("*.py"))
                 for name in _imports(p)
                 if name in ("sparsify_fx.prepare", "..prepare") or name.startswith("sparsify_fx.prepare.")]
    assert not offenders, offenders


def test_subpackages_install_under_sparsify_fx_only(tmp_path: pathlib.Path) -> None:
    code = ("import importlib.util as u, sparsify_fx.passes as p, sparsify_fx.export as e\n"
            "print(u.find_spec('passes') is None, u.find_spec('export') is None)\n"
            "print(p.__file__); print(e.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split("\n")
    assert out[0] == "True True"
    assert pathlib.Path(out[1]).parent == ROOT / "passes"
    assert pathlib.Path(out[2]).parent == ROOT / "export"
