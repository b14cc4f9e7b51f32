"""The flat ``sparsify_fx.passes.<module>`` paths of earlier releases still import, as the
very module objects of the sub-packages that hold the code now; ``passes/`` stays by concept."""
from __future__ import annotations

import importlib
import pathlib
import pickle
import subprocess
import sys

import pytest

from sparsify_fx.passes.moved import MOVED

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_old_from_imports_and_the_shrink_module_names() -> None:
    from sparsify_fx.passes import shrink_source  # noqa: F401  (old flat module)
    from sparsify_fx.passes.shrink import shrink, plan_shrink
    from sparsify_fx.passes.shrink.shrink_graph import shrink as new_shrink, plan_shrink as new_plan
    from sparsify_fx.passes.shrink_config import config_cannot_hold
    import sparsify_fx

    assert shrink is new_shrink and plan_shrink is new_plan
    assert config_cannot_hold is sparsify_fx.config_cannot_hold
    assert shrink_source.fold_to_source is sparsify_fx.fold_to_source
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        getattr(importlib.import_module("sparsify_fx.passes.shrink"), "not_a_name")


def test_a_fresh_process_resolves_an_old_path_before_anything_else_is_imported() -> None:
    code = ("import sparsify_fx.passes.count_macs as m, sys\n"
            "print(m.__name__, 'sparsify_fx.passes.macs.count' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["sparsify_fx.passes.macs.count", "True"]


def test_objects_pickled_under_a_class_path_still_load() -> None:
    from sparsify_fx.passes.channels.graph_types import Layout
    import numpy as np

    layout = Layout(ids=np.arange(4), zero=np.zeros(4, dtype=bool), cdim=-1, rank=2)
    new = pickle.dumps(layout, protocol=0)  # text protocol: module paths are plain lines
    assert b"sparsify_fx.passes.channels.graph_types" in new
    old = new.replace(b"sparsify_fx.passes.channels.graph_types", b"sparsify_fx.passes.channel_types")
    again = pickle.loads(old)
    assert type(again) is Layout and np.array_equal(again.ids, layout.ids)


def test_passes_top_level_holds_at_most_ten_modules() -> None:
    top = sorted(p.name for p in (ROOT / "passes").iterdir()
                 if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
    assert len(top) <= 10, top
    for pkg in (ROOT / "passes").iterdir():
        if pkg.is_dir() and (pkg / "__init__.py").exists():
            assert importlib.import_module(f"sparsify_fx.passes.{pkg.name}").__doc__, pkg.name
