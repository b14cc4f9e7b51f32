"""Transformer structured pruning speed: dense vs shrunk vit_b_16 (heads + MLP units) in onnxruntime.

vit_b_16 (torchvision, weights=None, classifier head given random weights) is
transformed with fixed channel masks (``method="magnitude"``): every attention
head and every MLP hidden unit is a slot, ranked by the mean |w| of the weights
it gates (``channel_l1_scores(per_weight=True)``). ``--selection uniform``
(default): every group (a layer's heads, an MLP) keeps the same fraction of its
slots, the largest that fits the MACs budget (measured by ``channel_macs``);
``--selection global``: ``apply_budget(target_macs=...)`` over one ranking (on a
random init it keeps every head). ``shrink`` removes the pruned heads and units. Dense and
shrunk models are exported through the verified ``export_onnx`` path and timed
in the same process with onnxruntime (CPU, ``--threads``, batch 1, 224x224),
interleaved run by run, median over ``--runs``. MACs come from ``report``
(``count_macs``: projections, attention matmuls, MLP, patch conv, classifier).

Usage: python benchmarks/transformer_speed.py [--runs 20] [--threads 2] [--macs 0.5]
Writes ``<out>.json``, ``<out>.md`` and ``<out>_report.md`` (``report`` before/after).
Target (issue 14): latency ratio <= 1.15 x MACs ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.models as tvm

from bench_io import command_line, machine, write_results

import sparsify_fx
from sparsify_fx.budgets.exact_cut import apply_budget, macs_fraction, weight_costs
from sparsify_fx.export.onnx_export import export_onnx, make_session
from sparsify_fx.latency.probe import interleaved_times
from sparsify_fx.export.report import report
from sparsify_fx.budgets.cost_model import channel_macs
from sparsify_fx.passes.channels.couple import channel_l1_scores, select_channels
from sparsify_fx.passes.shrink.shrink_graph import plan_shrink, shrink

TARGET = 1.15


def time_pair(paths: dict[str, Path], x: np.ndarray, runs: int, threads: int) -> dict[str, list]:
    """Per-run onnxruntime latencies (ms), dense and pruned interleaved (the library's
    timer: no thread spinning, order reversed every other round)."""
    sessions = [make_session(p, threads=threads) for p in paths.values()]
    return dict(zip(paths, interleaved_times(sessions, (x,), runs=runs, min_seconds=0.0)))


def uniform_cut(gm: torch.nn.Module, costs: dict, scores: dict, target: float) -> float:
    """Every group (each layer's heads, each MLP) keeps the same fraction of its slots (its
    largest mean |w|), the largest fraction (bisection) whose MACs fit ``target``."""
    cm = channel_macs(gm, costs)
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        select_channels(gm, max(mid, 1e-9), scores)
        lo, hi = (mid, hi) if cm.hard_fraction() <= target else (lo, mid)
    select_channels(gm, max(lo, 1e-9), scores)
    return lo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--macs", type=float, default=0.5, help="MACs budget (fraction of dense)")
    ap.add_argument("--selection", choices=["uniform", "global"], default="uniform",
                    help="uniform: same keep fraction in every head/unit group (heads are cut "
                    "too); global: one mean-|w| ranking over all slots (random init: keeps heads)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "transformer_speed"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = tvm.vit_b_16().eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sparsify_fx.transform(model, method="magnitude", granularity="channel")
    costs = weight_costs(gm, x)
    scores = channel_l1_scores(gm, per_weight=True)
    if args.selection == "global":
        apply_budget(gm, target_macs=args.macs, costs=costs, scores=scores)
    else:
        uniform_cut(gm, costs, scores, args.macs)
    plan = plan_shrink(gm)
    small = shrink(gm)
    with torch.no_grad(), sparsify_fx.hard_masks(gm):
        ref = gm(x)
        other = gm(torch.randn_like(x))
        parity = float((small(x) - ref).abs().max())
    varies = float((ref - other).abs().max())
    dense_rep, small_rep = report(model, x, name="vit_b_16"), report(small, x, name="shrunk")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "pruned": Path(tmp) / "pruned.onnx"}
        export = {k: export_onnx(m, x, paths[k], sparse=False, latency_runs=0)
                  for k, m in (("dense", model), ("pruned", small))}
        times = time_pair(paths, x.numpy(), args.runs, args.threads)
    med = {k: statistics.median(v) for k, v in times.items()}
    mac_ratio = small_rep.total_macs / dense_rep.total_dense_macs
    lat_ratio = med["pruned"] / med["dense"]
    mlp = {k: v for k, v in plan.layers.items() if k.endswith("mlp.0.weight")}
    result = {
        "command": command_line("transformer_speed.py", argv), "machine": machine(args.threads),
        "note": "machine shared with other engineers' jobs (loaded); interleaved runs, medians",
        "macs_budget": args.macs, "selection": args.selection,
        "macs_dense": dense_rep.total_dense_macs, "macs_pruned": small_rep.total_macs,
        "macs_ratio": mac_ratio, "budget_macs_fraction": macs_fraction(gm, costs),
        "heads_kept": {k: list(v) for k, v in plan.heads.items()},
        "mlp_units_kept": {k: list(v) for k, v in mlp.items()},
        "params_dense": sum(p.numel() for p in model.parameters()),
        "params_pruned": sum(p.numel() for p in small.parameters()),
        "latency_ms_dense": med["dense"], "latency_ms_pruned": med["pruned"],
        "latency_ms_all": times, "latency_ratio": lat_ratio,
        "latency_over_macs": lat_ratio / mac_ratio, "target": TARGET,
        "target_met": lat_ratio / mac_ratio <= TARGET,
        "shrink_max_abs_diff": parity, "output_variation": varies,
        "onnx_max_abs_diff": {k: e.max_abs_diff for k, e in export.items()},
        "runs": args.runs, "threads": args.threads,
    }
    heads = sum(a for a, _ in plan.heads.values()), sum(b for _, b in plan.heads.values())
    units = sum(a for a, _ in mlp.values()), sum(b for _, b in mlp.values())
    md = "\n".join([
        "# vit_b_16: heads + MLP units at 0.5 MACs, onnxruntime CPU",
        "", f"`{result['command']}`  ", f"{result['machine']} (loaded by other jobs)", "",
        "| | dense | shrunk | ratio |", "|---|---|---|---|",
        f"| GMACs | {dense_rep.total_dense_macs / 1e9:.3f} | {small_rep.total_macs / 1e9:.3f} "
        f"| {mac_ratio:.3f} |",
        f"| ORT median ms (batch 1, {args.threads} threads, {args.runs} interleaved runs) | "
        f"{med['dense']:.1f} | {med['pruned']:.1f} | {lat_ratio:.3f} |",
        f"| params | {result['params_dense']:,} | {result['params_pruned']:,} | "
        f"{result['params_pruned'] / result['params_dense']:.3f} |", "",
        f"heads kept {heads[0]} / {heads[1]}, MLP units kept {units[0]} / {units[1]}; "
        f"latency ratio / MACs ratio = {lat_ratio / mac_ratio:.3f} (target <= {TARGET}: "
        f"{'met' if result['target_met'] else 'NOT met'}); shrink max |diff| {parity:.1e} "
        f"(outputs vary by {varies:.2f} between inputs)", "",
        "| layer | heads kept | MLP units kept |", "|---|---|---|",
        *[f"| {k} | {a} / {b} | {mlp[k.replace('self_attention', 'mlp.0.weight')][0]} / "
          f"{mlp[k.replace('self_attention', 'mlp.0.weight')][1]} |"
          for k, (a, b) in plan.heads.items()],
    ])
    write_results(args.out, result, md)
    with open(args.out + "_report.md", "w") as f:  # report before/after, for docs/transformers.md
        f.write(dense_rep.compare(small_rep).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
