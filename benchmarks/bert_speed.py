"""BERT-base heads + MLP units at 0.5 of the MACs: dense vs shrunk in onnxruntime (issue 14).

``BertForSequenceClassification(BertConfig())`` (hidden 768, 12 layers, 12
heads, intermediate 3072; random weights, nothing downloads), sequence length
``--seq`` (128). ``plan_hf`` picks heads and MLP units by L1 magnitude under
``--macs`` of the encoder-layer MACs (``--selection uniform``: the same heads
and units per layer; ``global``: one mean-|w| ranking), ``shrink_hf`` builds the
smaller source model. Both models are captured with torch.export
(``transform``), exported through the verified ``export_onnx`` path and timed in
the same process with onnxruntime (CPU, ``--threads``, batch 1), interleaved run
by run, median over ``--runs``. MACs come from ``report`` on the captured
models (projections, attention matmuls, MLP, pooler, classifier). Parity: the
plan's hard-masked capture (``plan.model``; ``plan_hf`` is a preset over the general
structured path) against the shrunk model.

Usage: python benchmarks/bert_speed.py [--runs 20] [--threads 2] [--macs 0.5] [--seq 128]
Writes ``<out>.json`` and ``<out>.md``. Target (issue 14): latency ratio <= 1.15 x MACs ratio.
"""
from __future__ import annotations

import argparse
import os
import collections
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

from bench_io import command_line, machine, write_results
from transformer_speed import TARGET, time_pair

import sparsify_fx
from sparsify_fx.export.onnx_export import export_onnx


def capture(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
    """``transform`` through torch.export (element masks, all kept), eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify_fx.transform(model, example_inputs=(ids,), capture="export").eval()


def op_profile(paths: dict[str, Path], x: np.ndarray, runs: int, threads: int
               ) -> dict[str, dict[str, float]]:
    """onnxruntime's profiler: kernel ms per run by op type, per model (after 3 warm-up runs)."""
    out: dict[str, dict[str, float]] = {}
    for key, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(path.with_suffix(""))
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(3 + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
        kernels = [e for e in events if e.get("cat") == "Node"
                   and e["name"].endswith("_kernel_time")]
        per_run = len(kernels) // (3 + runs)
        totals: collections.Counter = collections.Counter()
        for e in kernels[3 * per_run:]:  # drop the warm-up runs
            totals[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
        out[key] = dict(totals.most_common())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--macs", type=float, default=0.5, help="MACs budget (fraction of dense)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--profile-runs", type=int, default=10,
                    help="runs of onnxruntime's per-op profiler (after the timed runs)")
    ap.add_argument("--selection", choices=["uniform", "global"], default="uniform")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bert_speed"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    other = torch.randint(0, model.config.vocab_size, (1, args.seq))
    t0 = time.perf_counter()
    plan = sparsify_fx.plan_hf(model, target_macs=args.macs, seq_len=args.seq,
                               selection=args.selection)
    small = sparsify_fx.shrink_hf(model, plan).eval()
    dense_gm, small_gm = capture(model, ids), capture(small, ids)
    capture_s = time.perf_counter() - t0
    dense_rep = sparsify_fx.report(dense_gm, (ids,), name="bert-base")
    small_rep = sparsify_fx.report(small_gm, (ids,), name="shrunk")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "pruned": Path(tmp) / "pruned.onnx"}
        export = {k: export_onnx(m, (ids,), paths[k], sparse=False, latency_runs=0)
                  for k, m in (("dense", dense_gm), ("pruned", small_gm))}
        times = time_pair(paths, ids.numpy(), args.runs, args.threads)
        profile = op_profile(paths, ids.numpy(), args.profile_runs, args.threads)
    with torch.no_grad():
        ref, out = plan.model(ids).logits, small(ids).logits
        parity = float((ref - out).abs().max())
        varies = float((small(other).logits - out).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}
    mac_ratio = small_rep.total_dense_macs / dense_rep.total_dense_macs
    lat_ratio = med["pruned"] / med["dense"]
    layers = small.bert.encoder.layer
    heads = [ly.attention.self.num_attention_heads for ly in layers]
    units = [ly.intermediate.dense.out_features for ly in layers]
    result = {
        "command": command_line("bert_speed.py", argv), "machine": machine(args.threads),
        "note": "machine shared with other engineers' jobs (loaded); interleaved runs, medians",
        "model": "BertForSequenceClassification(BertConfig()), random weights",
        "seq_len": args.seq, "macs_budget": args.macs, "selection": args.selection,
        "plan": plan.summary(), "plan_macs_ratio": plan.macs_ratio,
        "macs_dense": dense_rep.total_dense_macs, "macs_pruned": small_rep.total_dense_macs,
        "macs_ratio": mac_ratio, "heads_kept_per_layer": heads, "units_kept_per_layer": units,
        "params_dense": sum(p.numel() for p in model.parameters()),
        "params_pruned": sum(p.numel() for p in small.parameters()),
        "latency_ms_dense": med["dense"], "latency_ms_pruned": med["pruned"],
        "latency_ms_all": times, "latency_ratio": lat_ratio,
        "latency_ratio_median_of_pairs": statistics.median(
            p / d for p, d in zip(times["pruned"], times["dense"])),
        "latency_over_macs": lat_ratio / mac_ratio, "target": TARGET,
        "target_met": lat_ratio / mac_ratio <= TARGET,
        "shrink_max_abs_diff_logits": parity, "logits_variation": varies,
        "onnx_max_abs_diff": {k: e.max_abs_diff for k, e in export.items()},
        "op_profile_ms": profile, "capture_s": capture_s, "runs": args.runs,
        "threads": args.threads, "load_average_1min_after": os.getloadavg()[0],
    }
    md = "\n".join([
        f"# BERT-base encoder (seq {args.seq}): heads + MLP units at {args.macs} MACs, "
        "onnxruntime CPU",
        "", f"`{result['command']}`  ", f"{result['machine']}; 1-minute load average after the timing "
        f"{result['load_average_1min_after']:.2f} (2 cores)", "",
        "| | dense | shrunk | ratio |", "|---|---|---|---|",
        f"| GMACs (`report`, batch 1) | {dense_rep.total_dense_macs / 1e9:.3f} | "
        f"{small_rep.total_dense_macs / 1e9:.3f} | {mac_ratio:.3f} |",
        f"| ORT median ms (batch 1, {args.threads} threads, {args.runs} interleaved runs) | "
        f"{med['dense']:.1f} | {med['pruned']:.1f} | {lat_ratio:.3f} |",
        f"| params | {result['params_dense']:,} | {result['params_pruned']:,} | "
        f"{result['params_pruned'] / result['params_dense']:.3f} |", "",
        f"{plan.summary()} (selection {args.selection}; heads per layer {heads}, units per "
        f"layer {units}); latency ratio / MACs ratio = {lat_ratio / mac_ratio:.3f} (target <= "
        f"{TARGET}: {'met' if result['target_met'] else 'NOT met'}); shrink vs hard-masked "
        f"max |diff| of the logits {parity:.1e} (logits vary by {varies:.2f} between inputs); "
        f"onnxruntime vs PyTorch {export['dense'].max_abs_diff:.1e} (dense), "
        f"{export['pruned'].max_abs_diff:.1e} (shrunk)",
    ])
    mm = {k: sum(v for op, v in prof.items() if "MatMul" in op or "Gemm" in op)
          for k, prof in profile.items()}
    rest = {k: sum(prof.values()) - mm[k] for k, prof in profile.items()}
    md += "\n".join([
        "", "", f"onnxruntime profiler, kernel ms per run ({args.profile_runs} runs, after the "
        "timed runs):", "", "| ops | dense | shrunk | ratio |", "|---|---|---|---|",
        f"| MatMul / Gemm (incl. fused) | {mm['dense']:.1f} | {mm['pruned']:.1f} | "
        f"{mm['pruned'] / mm['dense']:.3f} |",
        f"| all other ops | {rest['dense']:.1f} | {rest['pruned']:.1f} | "
        f"{rest['pruned'] / rest['dense']:.3f} |",
        *[f"| {op} | {v:.1f} | {profile['pruned'].get(op, 0.0):.1f} | "
          f"{profile['pruned'].get(op, 0.0) / v:.3f} |"
          for op, v in list(profile["dense"].items())[:8] if v > 0], ""])
    write_results(args.out, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
