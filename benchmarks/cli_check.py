"""Check a ``sparsify-fx prune hf:... --task causal-lm`` output folder (issue 32, acceptance).

* ``AutoModelForCausalLM.from_pretrained(OUTDIR/hf)`` loads (local files only);
* one logit row of it on a validation block equals the row of ``OUTDIR/model.onnx`` (the
  pruned model as it was in memory, exported and verified by the run) in onnxruntime;
* it differs from the dense source on the same block (the cut changed the model);
* every pruned Linear weight of the loaded model keeps exactly N of every M inputs;
* perplexity before / after / onnxruntime as written in ``summary.json``.

Writes ``--out`` .json and .md (with the run's command and wall time).

    .venv/bin/python benchmarks/cli_check.py OUTDIR --out benchmarks/results/cli_smollm2_sparsegpt_24
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_io import command_line, machine, write_results


def nm_counts(model: torch.nn.Module, n: int, m: int) -> dict[str, Any]:
    """Linear weights (lm_head / embeddings aside) whose every group of ``m`` consecutive
    inputs holds at most ``n`` non-zeros (the N:M constraint), counted from the loaded
    tensors; ``groups_below_n``: groups with fewer (a kept weight that is exactly 0)."""
    ok, bad, zeros, total, below = [], [], 0, 0, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        w = mod.weight.detach()
        groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        (ok if bool((groups <= n).all()) else bad).append(name)
        below += int((groups < n).sum())
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"layers_n_of_m": len(ok), "layers_violating": bad, "groups_below_n": below,
            "zero_fraction": zeros / total}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir")
    p.add_argument("--out", required=True)
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--wall-start", type=float, default=None, help="epoch seconds the run began")
    p.add_argument("--wall-end", type=float, default=None)
    p.add_argument("--load-note", default="")
    args = p.parse_args(argv)
    import onnxruntime as ort
    import transformers
    from sparsify_fx.hf.checkpoint_files import load_pretrained
    out = Path(args.outdir)
    summary = json.loads((out / "summary.json").read_text())
    t0 = time.perf_counter()
    pruned = transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(out / "hf"), local_files_only=True).eval()
    load_s = time.perf_counter() - t0
    source = summary["recipe"]["model"].split(":", 1)[1]
    dense, tok = load_pretrained(source, "causal-lm")
    text = "def dumps(obj, *, skipkeys=False):\n    Serialize ``obj`` to a JSON formatted str."
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = pruned(ids).logits[0, -1]
        dense_row = dense(ids).logits[0, -1]
    sess = ort.InferenceSession(os.fspath(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: ids.numpy().astype(np.int64)}
    logits = torch.from_numpy(sess.run(None, feed)[0])
    # the prune job's model.onnx returns (batch, vocab, sequence), as its loss reads it
    want = logits[0, :, -1] if logits.shape[1] == got.shape[0] else logits[0, -1]
    n, m = (int(v) for v in args.pattern.split(":"))
    result = {
        "command": command_line("cli_check.py", argv), "machine": machine(1),
        "run_command": summary["command"], "run_wall_time_s": summary["wall_time_s"],
        "run_wall_clock_s": (args.wall_end - args.wall_start
                             if args.wall_start and args.wall_end else None),
        "load_note": args.load_note,
        "from_pretrained_seconds": load_s, "tokens": int(ids.shape[1]),
        "logit_row_max_abs_diff_vs_onnx": float((got - want).abs().max()),
        "logit_row_scale": float(want.abs().max()),
        "logit_row_max_abs_diff_vs_dense": float((got - dense_row).abs().max()),
        "argmax_equal_onnx": int(got.argmax()) == int(want.argmax()),
        "pattern": nm_counts(pruned, n, m),
        "perplexity": summary.get("perplexity"), "metric": summary.get("metric"),
        "sparsity": summary.get("sparsity"), "decoder": summary.get("decoder"),
        "bytes": summary.get("bytes"), "notes": summary.get("notes"),
        "summary": summary,
    }
    ppl = summary["perplexity"]
    pat = result["pattern"]
    wall = result["run_wall_clock_s"]
    md = [f"# `sparsify-fx prune` on SmolLM2-135M (GGUF): SparseGPT {args.pattern}", "",
          f"Run: `{summary['command']}`", "",
          f"Data: {summary['data']}.", "",
          f"Wall time: {summary['wall_time_s']:.0f} s as summary.json counts it"
          + (f"; {wall:.0f} s from start to exit (load, capture, every output)" if wall else "")
          + (f"; {args.load_note}" if args.load_note else "") + ".", "",
          "| perplexity (validation) | value |", "|---|---|",
          f"| before (dense, PyTorch) | {ppl['before']:.3f} |",
          f"| after (pruned, PyTorch) | {ppl['after']:.3f} |",
          f"| after (model.onnx, onnxruntime) | {ppl['onnx']:.3f} |", "",
          f"Check (`{result['command']}`): `AutoModelForCausalLM.from_pretrained(OUTDIR/hf)` "
          f"loads in {load_s:.1f} s; its last logit row on a {result['tokens']}-token input "
          f"differs from `model.onnx` (the pruned model as it was in memory) in onnxruntime by "
          f"{result['logit_row_max_abs_diff_vs_onnx']:.2e} (row scale "
          f"{result['logit_row_scale']:.1f}, argmax equal: {result['argmax_equal_onnx']}) and "
          f"from the dense model's by {result['logit_row_max_abs_diff_vs_dense']:.2f}. "
          f"{pat['layers_n_of_m']} Linear weights keep at most {n} non-zeros in every {m} "
          f"inputs ({len(pat['layers_violating'])} do not; {pat['groups_below_n']:,} groups "
          f"hold fewer: a kept weight that is exactly 0), zero fraction "
          f"{pat['zero_fraction']:.7f}.", "",
          "Notes of the run:", ""] + [f"- {x}" for x in summary.get("notes", [])]
    write_results(args.out, result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
