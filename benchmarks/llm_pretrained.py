"""Pruning a real pretrained LLM (issue 32): SmolLM2-135M from the ``pretrained`` extra.

The checkpoint is ``sparsify_fx.hf.pretrained.pretrained_path("smollm2")`` (a GGUF file,
de-quantized to float32 by transformers; 134.5 M parameters, tied lm_head not pruned).
Text: the pydocs corpus (``--corpus``; document ``i`` is validation iff ``i % 10 == 9``),
tokenized with the checkpoint's own tokenizer, an end-of-text token after each document.
Perplexity on the first ``--val-windows`` x ``--seq`` tokens of the validation stream.

Element part (``--parts element``), per seed, at 50 % (every layer) and 2:4:

* one-shot magnitude (per layer), Wanda and SparseGPT (``calibrate`` on ``--calib`` random
  training windows of ``--seq`` tokens, drawn per seed; ``sequential=False``: every
  layer's statistic from the dense model in one forward, see the note in docs/llm.md);
* ``oneshot + fine-tune``: the best one-shot mask (lowest ppl) fixed, weights trained for
  ``--steps`` x ``--batch`` x ``--seq`` tokens;
* ``cs (learned, from <best>)``: CS masks and weights trained on the same token budget,
  scores started from that mask (``init_cs_from_masks``, ``s_init``, no rescale); at 2:4
  the mask is learned as a pattern (every group's 4 scores compete for 2 places;
  ``Granularity.pattern_threshold``), ``mask_bits_changed`` counted by the scheduler.

Structured part (``--parts structured``): heads / KV groups / MLP units of a torch.export
capture cut to ``--block-keep`` of the blocks' MACs: one-shot L1, L1 + fine-tune, CS from
the L1 cut (same token budget), perplexity of the shrunk source-class model.

    .venv/bin/python benchmarks/llm_pretrained.py [--seeds 0] [--parts element structured]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from typing import Any

import torch

import sparsify_fx as sf
from bench_io import command_line, machine, write_results
from llm_pruning import CORPUS, nm_ok, weight_groups
from llm_text import load_split, perplexity, train_lm, windows
from sparsify_fx.baselines.mask_init import init_cs_from_masks

TARGETS = {"50%": ("element", 0.5), "2:4": ("2:4", None)}
ONESHOT = ("magnitude", "wanda", "sparsegpt")


class Text:
    """Token streams of the corpus under the checkpoint's tokenizer."""

    def __init__(self, tokenizer: Any, corpus: str, seq: int, val_windows: int) -> None:
        train_docs, val_docs = load_split(corpus)
        eos = tokenizer.eos_token_id

        def stream(docs: list[str]) -> torch.Tensor:
            ids: list[int] = []
            for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
                ids.extend(enc)
                ids.append(eos)
            return torch.tensor(ids, dtype=torch.long)

        self.train = stream(train_docs)
        val = stream(val_docs)
        n = min(val_windows, val.numel() // seq)
        self.val = val[: n * seq].reshape(n, seq)
        self.seq = seq


def capture(model: torch.nn.Module, seq: int, method: str, granularity: str,
            **options: Any) -> torch.nn.Module:
    """``transform`` of ``model`` on a torch.export capture, batch dynamic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sf.transform(model, method=method, granularity=granularity,
                            example_inputs=(torch.zeros(2, seq, dtype=torch.long),),
                            dynamic_shapes=({0: torch.export.Dim.AUTO},), **options)


def train(gm: torch.nn.Module, text: Text, args: argparse.Namespace, seed: int,
          mask_lr: float | None = None, sched: Any = None) -> float:
    """``--steps`` of LM loss (+ the CS penalty and beta step with ``sched``); seconds."""
    t0 = time.perf_counter()
    lr = args.cs_lr if sched is not None else args.ft_lr
    train_lm(gm, windows(text.train, text.seq, args.batch, 3000 + seed), args.steps, lr,
             groups=weight_groups(gm, lr, mask_lr), warmup=max(1, args.steps // 10),
             penalty=sched.penalty if sched is not None else None,
             after_step=(lambda _s: sched.step()) if sched is not None else None,
             log_every=args.log_every)
    return time.perf_counter() - t0


def element_rows(model: torch.nn.Module, text: Text, args: argparse.Namespace, seed: int,
                 dense_ppl: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any], gm: torch.nn.Module) -> None:
        row.update(seed=seed, sparsity=float(sf.sparsity(gm)), gap=row["ppl"] - dense_ppl)
        if row["target"] == "2:4":
            row["pattern_ok"] = nm_ok(gm)
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)

    calib = windows(text.train, text.seq, args.calib, 500 + seed)
    seqs = next(calib)
    batches = [(seqs[i:i + 8],) for i in range(0, seqs.shape[0], 8)]
    for target, (gran, sparsity) in TARGETS.items():
        oneshot: dict[str, tuple[torch.nn.Module, float]] = {}
        for method in args.oneshot:
            t0 = time.perf_counter()
            options: dict[str, Any] = {"target_sparsity": sparsity}
            if method == "magnitude" and gran == "element":
                options["scope"] = "layer"
            if method in ("wanda", "sparsegpt"):
                options["sequential"] = False
            gm = capture(model, text.seq, method, gran, **options)
            if method != "magnitude":
                sf.calibrate(gm, batches)
            seconds = time.perf_counter() - t0
            ppl = perplexity(gm, text.val)
            oneshot[method] = (gm, ppl)
            record({"method": method, "target": target, "ppl": ppl, "seconds": seconds,
                    "tokens": 0 if method == "magnitude" else args.calib * text.seq}, gm)
        best = min(oneshot, key=lambda m: oneshot[m][1])
        budget = args.steps * args.batch * text.seq
        torch.manual_seed(seed)
        cs = capture(model, text.seq, "cs", gran, target_sparsity=sparsity,
                     s_init=args.s_init, rescale=False, per_layer=True)
        init_cs_from_masks(cs, oneshot[best][0])
        sched = sf.CSScheduler(cs, epochs=1, per_step=True, steps_per_epoch=args.steps,
                               beta_final=args.beta_final)
        seconds = train(cs, text, args, seed, args.mask_lr, sched)
        if sched.cut is None:
            raise RuntimeError("the CS schedule did not make its exact cut")
        record({"method": f"cs (learned, from {best})", "target": target,
                "ppl": perplexity(cs, text.val), "seconds": seconds, "tokens": budget,
                "mask_bits_changed": sched.mask_bits_changed(),
                "mask_bits": sum(e.mask.numel() for e in sf.masks(cs))}, cs)
        del cs
        fixed = copy.deepcopy(oneshot[best][0])
        seconds = train(fixed, text, args, seed)
        record({"method": f"{best} + fine-tune (mask fixed)", "target": target,
                "ppl": perplexity(fixed, text.val), "seconds": seconds, "tokens": budget}, fixed)
        del fixed, oneshot
    return rows


def structured_rows(model: torch.nn.Module, text: Text, args: argparse.Namespace, seed: int,
                    dense_ppl: float) -> list[dict[str, Any]]:
    from sparsify_fx.budgets.cost_model import channel_macs
    from sparsify_fx.budgets.exact_cut import apply_budget, weight_costs
    from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
    rows: list[dict[str, Any]] = []
    x = (torch.zeros(1, text.seq, dtype=torch.long),)
    budget = args.steps * args.batch * text.seq
    for keep in args.block_keep:
        t0 = time.perf_counter()
        oneshot = capture(model, text.seq, "magnitude", "channel", capture="export").eval()
        blocks = sf.report(oneshot, x).blocks
        dense = channel_macs(oneshot, weight_costs(oneshot, x)).dense
        target = (keep * blocks["dense_macs"] + dense - blocks["dense_macs"]) / dense
        apply_budget(oneshot, target_macs=target,
                     scores=channel_l1_scores(oneshot, per_weight=True))
        l1_keep = {k: m.hard_mask().clone() for k, m in group_masks(oneshot).items()}
        small = sf.shrink(oneshot)
        base = {"target": f"{keep:g} of blocks' MACs", "seed": seed,
                "model_fraction": sf.report(oneshot, x).blocks["model_fraction"]}
        ppl = perplexity(small, text.val)
        rows.append({**base, "method": "L1 one-shot", "ppl": ppl, "gap": ppl - dense_ppl,
                     "seconds": time.perf_counter() - t0, "tokens": 0})
        print(rows[-1], flush=True)
        seconds = train(small, text, args, seed)
        ppl = perplexity(small, text.val)
        rows.append({**base, "method": "L1 + fine-tune", "ppl": ppl, "gap": ppl - dense_ppl,
                     "seconds": seconds, "tokens": budget})
        print(rows[-1], flush=True)
        del small
        torch.manual_seed(seed)
        cs = capture(model, text.seq, "cs", "channel", capture="export", target_macs=target,
                     s_init=1.0, rescale=False)
        init_cs_from_masks(cs, oneshot)
        sched = sf.CSScheduler(cs, epochs=1, per_step=True, steps_per_epoch=args.steps)
        seconds = train(cs, text, args, seed, args.channel_mask_lr, sched)
        changed = sum(int((m.hard_mask() != l1_keep[k]).sum())
                      for k, m in group_masks(cs).items())
        ppl = perplexity(sf.shrink(cs.eval()), text.val)
        rows.append({**base, "method": "CS from the L1 cut", "ppl": ppl, "gap": ppl - dense_ppl,
                     "seconds": seconds, "tokens": budget, "changed_slots": changed,
                     "slots": sum(v.numel() for v in l1_keep.values()),
                     "model_fraction": sf.report(cs, x).blocks["model_fraction"]})
        print(rows[-1], flush=True)
        del cs, oneshot
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for key in dict.fromkeys((r["method"], r["target"]) for r in rows):
        sel = [r for r in rows if (r["method"], r["target"]) == key]
        stat: dict[str, Any] = {"method": key[0], "target": key[1], "n": len(sel)}
        for col in ("ppl", "gap", "seconds", "tokens", "mask_bits_changed", "changed_slots"):
            vals = [r[col] for r in sel if col in r]
            if vals:
                stat[col] = statistics.mean(vals)
                stat[col + "_sd"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(stat)
    return out


def goal(summary: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Learned 2:4 gap against the best one-shot 2:4 gap (goal: ratio <= 0.5)."""
    nm = [s for s in summary if s["target"] == "2:4"]
    one = [s for s in nm if s["method"] in ONESHOT]
    cs = [s for s in nm if s["method"].startswith("cs")]
    if not one or not cs:
        return None
    best = min(one, key=lambda s: s["gap"])
    ratio = cs[0]["gap"] / best["gap"] if best["gap"] > 0 else None
    return {"cs_gap": cs[0]["gap"], "best_oneshot": best["method"], "best_gap": best["gap"],
            "ratio": ratio, "met": ratio is not None and ratio <= 0.5}


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = ["# SmolLM2-135M (pretrained) pruned on pydocs", "",
             f"`{result['command']}` — {result['machine']}", "",
             f"Model: {result['model']}. Validation: {result['val_tokens']:,} tokens "
             f"({a['val_windows']} x {a['seq']}); seeds {a['seeds']}. Calibration: {a['calib']} "
             f"x {a['seq']} = {a['calib'] * a['seq']:,} training tokens. Training rows: "
             f"{a['steps']} steps x {a['batch']} x {a['seq']} = "
             f"{a['steps'] * a['batch'] * a['seq']:,} tokens (lr: CS weights {a['cs_lr']}, "
             f"fine-tune {a['ft_lr']}, CS scores {a['mask_lr']} (element / 2:4), "
             f"{a['channel_mask_lr']} (channels); s_init {a['s_init']}, beta 1 -> "
             f"{a['beta_final']}).", "",
             f"Dense perplexity: **{result['dense_ppl']:.3f}**.", "",
             "| method | target | ppl | gap to dense | training tokens | mask bits / slots "
             "changed | seconds |", "|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        sd = f" ± {s['ppl_sd']:.3f}" if s["n"] > 1 else ""
        changed = ""
        if "mask_bits_changed" in s:
            changed = f"{s['mask_bits_changed']:,.0f}"
        elif "changed_slots" in s:
            changed = f"{s['changed_slots']:,.0f} slots"
        lines.append(f"| {s['method']} | {s['target']} | {s['ppl']:.3f}{sd} | {s['gap']:+.3f} | "
                     f"{s['tokens']:,.0f} | {changed} | {s['seconds']:.0f} |")
    g = result.get("goal")
    if g:
        ratio = "undefined" if g["ratio"] is None else f"{g['ratio']:.2f}"
        lines += ["", f"Goal: learned 2:4 gap {g['cs_gap']:+.3f} vs best one-shot "
                  f"({g['best_oneshot']}) {g['best_gap']:+.3f}: ratio {ratio} "
                  f"({'met' if g['met'] else 'not met'}; goal <= 0.5)."]
    lines += ["", f"Total wall time {result['seconds']:.0f} s (load average after: "
              f"{result['load_average']:.1f})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--out", default="benchmarks/results/llm_pretrained")
    p.add_argument("--parts", nargs="+", default=["element", "structured"],
                   choices=["element", "structured"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--val-windows", type=int, default=16)
    p.add_argument("--calib", type=int, default=32, help="calibration windows of --seq tokens")
    p.add_argument("--oneshot", nargs="+", default=list(ONESHOT), choices=ONESHOT)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cs-lr", type=float, default=2e-5)
    p.add_argument("--ft-lr", type=float, default=2e-5)
    p.add_argument("--mask-lr", type=float, default=0.05)
    p.add_argument("--channel-mask-lr", type=float, default=0.2)
    p.add_argument("--s-init", type=float, default=1.0)
    p.add_argument("--beta-final", type=float, default=20.0)
    p.add_argument("--block-keep", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from sparsify_fx.hf.checkpoint_files import load_pretrained
    from sparsify_fx.hf.pretrained import CHECKPOINTS, pretrained_path
    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(pretrained_path("smollm2"), "causal-lm")
    model.config.use_cache = False
    text = Text(tokenizer, args.corpus, args.seq, args.val_windows)
    dense_ppl = perplexity(model, text.val)
    print(f"dense ppl {dense_ppl:.3f} ({text.val.numel()} tokens)", flush=True)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        if "element" in args.parts:
            rows += element_rows(model, text, args, seed, dense_ppl)
        if "structured" in args.parts:
            rows += structured_rows(model, text, args, seed, dense_ppl)
    summary = summarize(rows)
    result = {"command": command_line("llm_pretrained.py", argv), "machine": machine(args.threads),
              "args": vars(args), "model": CHECKPOINTS["smollm2"].description,
              "params": sum(p.numel() for p in model.parameters()),
              "train_tokens": int(text.train.numel()), "val_tokens": int(text.val.numel()),
              "dense_ppl": dense_ppl, "rows": rows, "summary": summary,
              "goal": goal(summary), "seconds": time.perf_counter() - t0,
              "load_average": os.getloadavg()[0]}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
