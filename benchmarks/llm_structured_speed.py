"""Structured pruning of export captures (issue 22): onnxruntime latency vs MACs, dense and shrunk.

Two models with random weights (nothing downloads):

* a Llama-style decoder, ``LlamaForCausalLM(LlamaConfig(hidden_size=768,
  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
  intermediate_size=2048, vocab_size=8192, use_cache=False))``: grouped-query
  attention (3 query heads per KV group); vocab 8192 since with random weights no
  tokenizer is needed and a 32k vocabulary would only inflate the dense lm_head
  and embedding, which structured pruning leaves whole;
* BERT-base, ``BertForSequenceClassification(BertConfig())``.

For each, batch 1, sequence ``--seq`` (128): ``transform(granularity="channel",
capture="export", dynamic batch and sequence)``, one-shot L1 scores
(``channel_l1_scores(gm, per_weight=True)``), ``apply_budget(target_macs=t,
scores=...)`` with ``t = (0.5 * blocks_dense + rest) / dense`` from the unpruned
capture's ``report(...).blocks`` (the pruned blocks keep 0.5 of their MACs; the
embedding, lm_head / pooler and the rest stay whole), ``shrink`` (the source
class). Dense and shrunk models are exported by ``export_onnx`` (verified) and
timed with ``int8_speed.time_files``: each file in a process of its own (default
session options, 2 intra-op threads; warm-up, then >= ``--runs`` runs and >= 1 s),
the two files alternating for ``--rounds`` rounds. The latency fraction is the
median over rounds of shrunk ms / dense ms of the same round; the MACs fractions
are ``report(gm, x).blocks`` (``model_fraction``: the whole model as shrunk /
dense; ``fraction``: the pruned blocks).

    .venv/bin/python benchmarks/llm_structured_speed.py [--quick] [--rounds 5] [--runs 20]
        [--models llama bert] [--out benchmarks/results/llm_structured_speed]

Goal: latency fraction / whole-model MACs fraction <= 1.15.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench_io import command_line, machine, write_results
from int8_speed import THREADS, save_feed, time_files
from llm_structured_accuracy import accuracy, add_arguments

GOAL = 1.15
BLOCK_KEEP = 0.5


def build(name: str, quick: bool) -> torch.nn.Module:
    import transformers
    if name == "llama":
        size = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=256, vocab_size=1024) if quick \
            else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, intermediate_size=2048, vocab_size=8192)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **size, max_position_embeddings=512, use_cache=False))
    size = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=512, vocab_size=1024) if quick else {}
    return transformers.BertForSequenceClassification(transformers.BertConfig(**size))


def prune(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The capture cut to ``BLOCK_KEEP`` of the blocks' MACs by one-shot L1 (and its info)."""
    import sparsify_fx as sf
    from sparsify_fx.budgets.cost_model import channel_macs
    from sparsify_fx.budgets.exact_cut import apply_budget, weight_costs
    from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
    from torch.export import Dim
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(model, method="magnitude", granularity="channel", target_macs=0.5,
                          example_inputs=(ids,), capture="export",
                          dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},)).eval()
    capture_s = time.perf_counter() - t0
    before = sf.report(gm, (ids,)).blocks
    dense = channel_macs(gm, weight_costs(gm, (ids,))).dense
    target = (BLOCK_KEEP * before["dense_macs"] + dense - before["dense_macs"]) / dense
    scores = channel_l1_scores(gm, per_weight=True)
    apply_budget(gm, target_macs=target, scores=scores)
    blocks = sf.report(gm, (ids,)).blocks
    groups = group_masks(gm)
    kept = {k: [int(m.hard_mask().sum()), int(m.hard_mask().numel())] for k, m in groups.items()}
    return gm, {"capture_s": capture_s, "target_macs": target, "macs_dense": dense,
                "blocks_dense_macs": before["dense_macs"], "blocks_layers": len(before["layers"]),
                "blocks_fraction": blocks["fraction"], "model_fraction": blocks["model_fraction"],
                "groups_kept": kept}


def logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def run_model(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import sparsify_fx as sf
    torch.manual_seed(0)
    model = build(name, args.quick).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    t0 = time.perf_counter()
    gm, info = prune(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = sf.shrink(gm).eval()
    with torch.no_grad(), sf.hard_masks(gm):
        ref = logits(gm(ids))
    with torch.no_grad():
        parity = float((logits(small(ids)) - ref).abs().max())
    prune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    paths = {"dense": work / f"{name}_dense.onnx", "shrunk": work / f"{name}_shrunk.onnx"}
    export = {k: sf.export_onnx(m, (ids,), paths[k], sparse=False, latency_runs=0)
              for k, m in (("dense", model), ("shrunk", small))}
    export_s = time.perf_counter() - t0
    forms = time_files(paths, save_feed(work, name, [ids.numpy()]), args.rounds, args.runs)
    lat = forms["shrunk"]["latency_ratio"]
    row = {
        "model": name, "class": type(model).__name__,
        "config": {k: getattr(model.config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size") if hasattr(model.config, k)},
        "shrunk_class": type(small).__name__,
        **info, "latency_ms_dense": forms["dense"]["ms"],
        "latency_ms_shrunk": forms["shrunk"]["ms"], "ms_rounds": {
            k: v["ms_rounds"] for k, v in forms.items()},
        "latency_fraction": lat, "latency_over_macs": lat / info["model_fraction"],
        "goal_met": lat / info["model_fraction"] <= GOAL,
        "params_dense": sum(p.numel() for p in model.parameters()),
        "params_shrunk": sum(p.numel() for p in small.parameters()),
        "onnx_bytes": {k: v["bytes"] for k, v in forms.items()},
        "shrink_vs_masked_max_abs_diff": parity,
        "onnx_max_abs_diff": {k: e.max_abs_diff for k, e in export.items()},
        "prune_s": prune_s, "export_s": export_s,
    }
    print(f"{name}: MACs whole {info['model_fraction']:.3f}, blocks {info['blocks_fraction']:.3f}; "
          f"ORT {row['latency_ms_dense']:.1f} -> {row['latency_ms_shrunk']:.1f} ms "
          f"(fraction {lat:.3f}); latency/MACs {row['latency_over_macs']:.3f}", flush=True)
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Structured pruning of torch.export captures: onnxruntime latency vs MACs", "",
             f"`{result['command']}`  ", f"{result['machine']}; each file timed in its own "
             f"process, alternating, {result['rounds']} rounds; 1-minute load average after "
             f"{result['load_average_1min_after']:.2f} (2 cores, shared)", ""]
    if result["rows"]:  # --models with no names: the accuracy part alone
        lines += ["| model | whole-model MACs fraction | blocks MACs fraction | dense ms "
                  "| shrunk ms | latency fraction | latency / MACs | goal <= 1.15 |",
                  "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} ({r['class']}) | {r['model_fraction']:.3f} | "
            f"{r['blocks_fraction']:.3f} | {r['latency_ms_dense']:.1f} | "
            f"{r['latency_ms_shrunk']:.1f} | {r['latency_fraction']:.3f} | "
            f"{r['latency_over_macs']:.3f} | {'met' if r['goal_met'] else 'NOT met'} |")
    lines.append("")
    for r in result["rows"]:
        kept = ", ".join(f"{a}/{b}" for a, b in list(r["groups_kept"].values()))
        lines.append(f"- {r['model']}: {r['config']}; target_macs {r['target_macs']:.4f} "
                     f"(blocks {r['blocks_dense_macs'] / r['macs_dense']:.3f} of the dense "
                     f"MACs); shrunk: {r['shrunk_class']}; params "
                     f"{r['params_dense']:,} -> {r['params_shrunk']:,}; shrunk vs hard-masked "
                     f"{r['shrink_vs_masked_max_abs_diff']:.1e}; slots kept per group (heads or KV groups, MLP units, in graph order): {kept}")
    if result.get("accuracy"):
        from llm_structured_accuracy import markdown as accuracy_markdown
        lines += ["", accuracy_markdown(result["accuracy"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small configs, 2 rounds (smoke run)")
    ap.add_argument("--models", nargs="*", default=["llama", "bert"], choices=["llama", "bert"],
                    help="speed models (none: --accuracy only)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--accuracy", action="store_true", help="also the perplexity part")
    add_arguments(ap)  # --seeds, --steps, learning rates, --cache (llm_structured_accuracy)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"
                                         / "llm_structured_speed"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.runs = min(args.rounds, 2), min(args.runs, 5)
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_model(name, Path(tmp), args) for name in args.models]
    acc = accuracy(args) if args.accuracy else None
    result = {"command": command_line("llm_structured_speed.py", argv),
              "machine": machine(THREADS), "seq_len": args.seq, "batch": 1,
              "block_keep": BLOCK_KEEP, "rounds": args.rounds, "runs": args.runs,
              "scores": "one-shot L1 (channel_l1_scores(gm, per_weight=True))",
              "goal": f"latency fraction / whole-model MACs fraction <= {GOAL}",
              "rows": rows, "accuracy": acc, "wall_s": time.perf_counter() - t0,
              "load_average_1min_after": os.getloadavg()[0]}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
