"""Sparse ONNX file size and onnxruntime latency of resnet18 at several global sparsities.

For each sparsity: prune every Conv/Linear weight of a random-init resnet18
(weights=None) by global magnitude (or a global random mask), export with
``sparsify_fx.export_onnx`` (sparse, verified) and once more dense, and print

* sparse bytes / dense bytes of the exported file,
* the COO lower bound / dense bytes (12 bytes per nonzero of each weight stored
  sparse, or its dense bytes where that is smaller, plus the rest of the file),
* onnxruntime median latency of the dense and the sparse file (interleaved runs).

Usage: python benchmarks/onnx_size.py [--out benchmarks/results/onnx_size.json]
       [--sparsities 0.5,0.8,0.9,0.95] [--image-size 224] [--mask magnitude|random]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision.models as tvm

import sparsify_fx
from sparsify_fx.export.onnx_export import make_session
from sparsify_fx.latency.probe import time_interleaved
from sparsify_fx.export.sparse_initializers import coo_lower_bound


def prune_global(model: torch.nn.Module, sparsity: float, how: str, seed: int) -> None:
    """Freeze every mask so that ``sparsity`` of all masked weights is zero (global cut)."""
    entries = sparsify_fx.masks(model)
    gen = torch.Generator().manual_seed(seed)
    scores = [e.weight.detach().abs() if how == "magnitude"
              else torch.rand(e.mask.score_shape, generator=gen) for e in entries]
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = int(round(sparsity * flat.numel()))
    threshold = flat.kthvalue(k).values if k > 0 else flat.min() - 1
    for entry, score in zip(entries, scores):
        entry.mask.freeze(score > threshold)


def latencies(paths: list[Path], x: np.ndarray, runs: int, threads: int) -> list[float]:
    """Median ms per file, runs interleaved so that both see the same machine load."""
    sessions = [make_session(p, threads) for p in paths]
    return time_interleaved(sessions, (x,), runs=runs, min_seconds=0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "onnx_size.json"))
    p.add_argument("--sparsities", default="0.5,0.8,0.9,0.95")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--mask", choices=("magnitude", "random"), default="magnitude")
    p.add_argument("--runs", type=int, default=20, help="latency runs per file")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, args.image_size, args.image_size)
    rows = []
    print(f"resnet18, {args.mask} global pruning, input {tuple(x.shape)}, "
          f"onnxruntime {args.threads} threads, median of {args.runs}")
    print(f"{'sparsity':>8} {'sparse/dense':>12} {'COO bound':>10} {'sparse MB':>10} "
          f"{'dense MB':>9} {'#sparse':>8} {'max diff':>9} {'tolerance':>9} {'dense ms':>9} {'sparse ms':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for level in [float(s) for s in args.sparsities.split(",")]:
            gm = sparsify_fx.transform(tvm.resnet18().eval(), method="cs")
            prune_global(gm, level, args.mask, seed=0)
            measured = float(sparsify_fx.sparsity(gm))
            sparse = sparsify_fx.export_onnx(gm, x, Path(tmp) / "sparse.onnx", latency_runs=0)
            dense = sparsify_fx.export_onnx(gm, x, Path(tmp) / "dense.onnx", sparse=False,
                                            latency_runs=0)
            bound = coo_lower_bound(onnx.load(str(dense.path)))
            dense_ms, sparse_ms = latencies([dense.path, sparse.path], x.numpy(), args.runs,
                                            args.threads)
            row = {"target_sparsity": level, "measured_sparsity": measured,
                   "sparse_bytes": sparse.bytes, "dense_bytes": sparse.dense_bytes,
                   "dense_file_bytes": dense.bytes, "ratio": sparse.ratio,
                   "coo_lower_bound_bytes": bound, "coo_lower_bound_ratio": bound / dense.bytes,
                   "sparse_initializers": len(sparse.sparse_names),
                   "initializers": len(sparse.initializers),
                   "max_abs_diff": sparse.max_abs_diff, "tolerance": sparse.tolerance,
                   "dense_ms": dense_ms,
                   "sparse_ms": sparse_ms}
            rows.append(row)
            print(f"{measured:8.3f} {row['ratio']:12.3f} {row['coo_lower_bound_ratio']:10.3f} "
                  f"{sparse.bytes / 1e6:10.2f} {sparse.dense_bytes / 1e6:9.2f} "
                  f"{len(sparse.sparse_names):>3}/{len(sparse.initializers):<4} "
                  f"{sparse.max_abs_diff:9.2g} {sparse.tolerance:9.2g} {dense_ms:9.2f} {sparse_ms:9.2f}", flush=True)
    at90 = [r for r in rows if abs(r["target_sparsity"] - 0.9) < 1e-9]
    if at90:
        verdict = "met" if at90[0]["ratio"] <= 0.31 else "MISSED"
        print(f"target at 90 %: sparse/dense <= 0.31 -> {at90[0]['ratio']:.3f} ({verdict})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "resnet18", "mask": args.mask,
                               "input_shape": list(x.shape), "threads": args.threads,
                               "runs": args.runs, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
