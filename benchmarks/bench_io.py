"""Shared output of the benchmark scripts: the command and machine line, JSON + markdown files.

Imported as ``from bench_io import ...`` (a script's own folder is on ``sys.path``).
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
from typing import Any

import torch


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run (``argv`` None: the real command line)."""
    return " ".join([f".venv/bin/python benchmarks/{script}",
                     *(sys.argv[1:] if argv is None else argv)])


def machine(threads: int = 1) -> str:
    return f"{platform.machine()}, torch {torch.__version__}, {threads} thread(s)"


def write_results(out: str, result: dict[str, Any], markdown: str) -> None:
    """Print ``markdown``; write ``<out>.json`` and ``<out>.md``."""
    print(markdown)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(markdown)


@torch.no_grad()
def mean_sd_by_method(rows: list[dict[str, Any]], columns: tuple[str, ...]
                      ) -> list[dict[str, Any]]:
    """One row per ``(method, target)`` (first-seen order): ``n`` and, for each of
    ``columns`` the rows hold (not None), its mean and population sd (``<col>_sd``;
    0.0 for one row): several seeds' rows as a table's row."""
    out = []
    for key in dict.fromkeys((r["method"], r["target"]) for r in rows):
        sel = [r for r in rows if (r["method"], r["target"]) == key]
        stat: dict[str, Any] = {"method": key[0], "target": key[1], "n": len(sel)}
        for col in columns:
            vals = [r[col] for r in sel if r.get(col) is not None]
            if vals:
                stat[col] = statistics.mean(vals)
                stat[col + "_sd"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(stat)
    return out


def shrink_checked(gm: torch.nn.Module, x: torch.Tensor, tol: float = 1e-4) -> tuple[Any, float]:
    """``sparsify_fx.shrink(gm)`` in eval mode, checked against the hard-masked ``gm`` on
    ``x``: returns ``(shrunk, max abs diff)``; AssertionError past ``tol``."""
    import sparsify_fx as sf
    small = sf.shrink(gm)
    gm.eval()
    small.eval()
    with sf.hard_masks(gm):
        diff = float((gm(x) - small(x)).abs().max())
    if diff > tol:
        raise AssertionError(f"shrunk output differs from the masked output by {diff:.2e}")
    return small, diff


def torchvision_channel_cs(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.nn.Module]:
    """(torchvision ``name`` with random weights in eval mode (seed 0), a ``1x3x224x224``
    input, its ``transform(method="cs", granularity="channel")``): the starting point of
    the channel speed benchmarks. Transform warnings (residual streams) are silenced."""
    import warnings

    import torchvision.models as tvm

    import sparsify_fx
    torch.manual_seed(0)
    model = getattr(tvm, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sparsify_fx.transform(model, method="cs", granularity="channel")
    return model, x, gm
