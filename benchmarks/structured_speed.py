"""Structured (channel) pruning speed: onnxruntime latency vs MACs, dense and shrunk.

For each model (torchvision, weights=None): transform with CS channel masks,
give the group scores random values (stand-in for trained scores), keep the
top half of every channel group (``select_channels(gm, 0.5)``), ``shrink``,
export dense and shrunk models through the verified ``export_onnx`` path and
time both in the same process with onnxruntime (CPU, 2 threads, batch 1,
224x224), interleaved, median over ``--runs``. MACs come from
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2).

Usage: python benchmarks/structured_speed.py [--models resnet18 mobilenet_v2]
       [--runs 100] [--out benchmarks/results/structured_speed.json]
Target (issue 7): latency ratio <= 1.15 x MACs ratio for resnet18.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import sparsify_fx
from bench_io import torchvision_channel_cs
from sparsify_fx.export.onnx_export import export_onnx, make_session
from sparsify_fx.latency.probe import interleaved_times
from sparsify_fx.passes.channels.couple import group_masks, select_channels
from sparsify_fx.passes.shrink.shrink_graph import plan_shrink, shrink

TARGET = 1.15


def macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def time_pair(paths: dict[str, Path], x: np.ndarray, runs: int, threads: int) -> dict[str, float]:
    """Median ms per file, interleaved (the library's timer: no thread spinning)."""
    sessions = [make_session(p, threads=threads) for p in paths.values()]
    times = interleaved_times(sessions, (x,), runs=runs, min_seconds=0.0, warmup=5)
    return {k: statistics.median(v) for k, v in zip(paths, times)}


def run_model(name: str, runs: int, threads: int, keep: float, workdir: Path) -> dict:
    model, x, gm = torchvision_channel_cs(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in group_masks(gm).values():
            m.scores.copy_(torch.randn(m.score_shape, generator=g))
    select_channels(gm, keep)
    plan = plan_shrink(gm)
    small = shrink(gm)
    with torch.no_grad(), sparsify_fx.hard_masks(gm):
        ref = gm(x)
        parity = float((small(x) - ref).abs().max() / ref.abs().max().clamp_min(1.0))
    paths = {"dense": workdir / f"{name}_dense.onnx", "pruned": workdir / f"{name}_pruned.onnx"}
    export = {k: export_onnx(m, x, paths[k], sparse=False, latency_runs=0)
              for k, m in (("dense", model), ("pruned", small))}
    lat = time_pair(paths, x.numpy(), runs, threads)
    mac = {"dense": macs(model, x), "pruned": macs(small, x)}
    kept = sum(a for a, _ in plan.layers.values())
    total = sum(b for _, b in plan.layers.values())
    row = {
        "model": name,
        "channel_keep_fraction": keep,
        "layer_channels_kept": {k: list(v) for k, v in plan.layers.items()},
        "channels_kept_fraction": kept / total,
        "macs_dense": mac["dense"], "macs_pruned": mac["pruned"],
        "macs_ratio": mac["pruned"] / mac["dense"],
        "params_dense": sum(p.numel() for p in model.parameters()),
        "params_pruned": sum(p.numel() for p in small.parameters()),
        "latency_ms_dense": lat["dense"], "latency_ms_pruned": lat["pruned"],
        "latency_ratio": lat["pruned"] / lat["dense"],
        "shrink_max_rel_diff": parity,
        "onnx_max_abs_diff": {k: e.max_abs_diff for k, e in export.items()},
        "runs": runs, "threads": threads,
    }
    row["latency_over_macs"] = row["latency_ratio"] / row["macs_ratio"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=float, default=0.5, help="channel keep fraction per group")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "structured_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = run_model(name, args.runs, args.threads, args.keep, Path(tmp))
            rows.append(row)
            print(f"{name}: MACs {row['macs_dense'] / 1e9:.3f} G -> {row['macs_pruned'] / 1e9:.3f} G "
                  f"(ratio {row['macs_ratio']:.3f}); ORT median {row['latency_ms_dense']:.2f} ms -> "
                  f"{row['latency_ms_pruned']:.2f} ms (ratio {row['latency_ratio']:.3f}); "
                  f"latency/MACs {row['latency_over_macs']:.2f}; params {row['params_dense']:,} -> "
                  f"{row['params_pruned']:,}; shrink rel. diff {row['shrink_max_rel_diff']:.1e}")
    target = next((r for r in rows if r["model"] == "resnet18"), None)
    result = {"rows": rows, "target": f"resnet18 latency ratio <= {TARGET} x MACs ratio"}
    if target is not None:
        result["target_met"] = target["latency_over_macs"] <= TARGET
        print(f"target (resnet18 latency ratio <= {TARGET} x MACs ratio): "
              f"{'met' if result['target_met'] else 'NOT met'} "
              f"({target['latency_over_macs']:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
