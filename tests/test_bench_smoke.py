"""``make bench`` in CI: ``benchmarks/compare.py --quick`` runs every method end to end."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a whole benchmark run in a subprocess: `make test-all` / `make bench`
def test_compare_quick_runs_every_method_at_exact_sparsity(tmp_path: pathlib.Path) -> None:
    stem = tmp_path / "quick"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick",
                           "--out", str(stem)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(stem.with_suffix(".json").read_text())
    runs = result["runs"]
    methods = {r["method"] for r in runs}
    assert {"dense", "cs", "magnitude", "gmp", "imp", "l0", "ste", "random"} <= methods
    for r in runs:
        if r["method"] == "dense":
            continue
        # zeros counted in the folded tensors, exact to one weight
        assert abs(r["kept_weights"] - (1 - r["target"]) * r["total_weights"]) <= 1, r
        assert 0.0 <= r["test_acc"] <= 100.0
    assert stem.with_suffix(".png").stat().st_size > 10_000
