"""Pruning a real pretrained LLM (issue 32): SmolLM2-135M from the ``pretrained`` extra.

The checkpoint is ``sparsify_fx.hf.pretrained.pretrained_path("smollm2")`` (a GGUF file,
de-quantized to float32 by transformers; 134.5 M parameters, tied lm_head not pruned).
Text: the pydocs corpus (``--corpus``; document ``i`` is validation iff ``i % 10 == 9``),
tokenized with the checkpoint's own tokenizer, an end-of-text token after each document.
Perplexity on the first ``--val-windows`` x ``--seq`` tokens of the validation stream.

Element part (``--parts element``), per seed, for each of ``--targets`` (2:4 first, then
50 % of every layer):

* one-shot magnitude (per layer), Wanda and SparseGPT. Calibration: ``--calib`` random
  training windows of ``--seq`` tokens (drawn per seed), **one** pass through the dense
  model collects every layer's input Hessian (``collect_statistics``); each Wanda /
  SparseGPT model is cut from it (``calibrate(gm, statistics=...)``, ``sequential=False``:
  every layer's statistic from the dense model; Wanda reads the Hessian's diagonal);
* ``cs (learned, from <best>)``: CS masks and weights trained for ``--steps`` x ``--batch``
  x ``--train-seq`` tokens, scores started from the best one-shot mask
  (``init_cs_from_masks``, ``+-s_init``); at 2:4 every group's 4 scores compete for 2
  places (``Granularity.pattern_threshold``); ``mask_bits_changed`` from the scheduler;
* ``<best> + fine-tune (mask fixed)``: the same mask and token budget, weights only.

Masks on the HF model are parametrized Linear weights (``transform(capture="fx")``: the
model does not trace whole, so each Linear is masked in place, ~10 s) rather than a
30-layer torch.export capture (~3 min each); element and N:M masks need no graph.
Results are rewritten after every row (``"complete": false`` until the end).

Structured part (``--parts structured``): heads / KV groups / MLP units of a torch.export
capture cut to ``--block-keep`` of the blocks' MACs: one-shot L1, L1 + fine-tune, CS from
the L1 cut (same token budget), perplexity of the shrunk source-class model.

    nice -n 15 .venv/bin/python benchmarks/llm_pretrained.py --parts element [--seeds 0]
    .venv/bin/python benchmarks/llm_pretrained.py --merge a.json b.json --out merged
"""
from __future__ import annotations

import argparse
import gc
import os
import time
import warnings
from typing import Any

import torch

import sparsify_fx as sf
from bench_io import command_line, machine, mean_sd_by_method, write_results
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
            how: str = "fx", **options: Any) -> torch.nn.Module:
    """``transform`` of ``model``. ``how="fx"``: the HF model does not trace whole, so every
    Linear weight is masked by parametrization (about 10 s; element and N:M masks need no
    graph); ``"export"``: a torch.export capture, batch and length dynamic (training windows
    of ``--train-seq`` differ from the ``--seq`` example; about 3 min for 30 layers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "fx":
            return sf.transform(model, method=method, granularity=granularity, capture="fx",
                                **options)
        return sf.transform(model, method=method, granularity=granularity,
                            example_inputs=(torch.zeros(2, seq, dtype=torch.long),),
                            dynamic_shapes=({0: torch.export.Dim.AUTO,
                                             1: torch.export.Dim.AUTO},), **options)


def train(gm: torch.nn.Module, text: Text, args: argparse.Namespace, seed: int,
          mask_lr: float | None = None, sched: Any = None) -> float:
    """``--steps`` of LM loss on ``--batch`` x ``--train-seq`` windows (+ the CS penalty and
    beta step with ``sched``); seconds."""
    t0 = time.perf_counter()
    lr = args.cs_lr if sched is not None else args.ft_lr
    train_lm(gm, windows(text.train, args.train_seq, args.batch, 3000 + seed), args.steps, lr,
             groups=weight_groups(gm, lr, mask_lr), warmup=max(1, args.steps // 10),
             penalty=sched.penalty if sched is not None else None,
             after_step=(lambda _s: sched.step()) if sched is not None else None,
             log_every=args.log_every)
    return time.perf_counter() - t0


def element_rows(model: torch.nn.Module, text: Text, args: argparse.Namespace, seed: int,
                 dense_ppl: float, flush: Any = None) -> list[dict[str, Any]]:
    """One-shot, CS (learned from the best one-shot mask) and that mask fixed + fine-tune,
    per target of ``--targets``. Calibration: one pass of ``--calib`` windows through the
    dense model gives every layer's input Hessian (``collect_statistics``); Wanda (its
    diagonal) and SparseGPT at every target are cut from it (``sequential=False``).
    ``flush(rows)`` after each row."""
    from sparsify_fx.baselines.calibration import collect_statistics
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any], gm: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        row["ppl"] = perplexity(gm, text.val, batch=args.eval_batch)
        row.update(seed=seed, sparsity=float(sf.sparsity(gm)), gap=row["ppl"] - dense_ppl,
                   eval_seconds=time.perf_counter() - t0, load_average=os.getloadavg()[0])
        if row["target"] == "2:4":
            row["pattern_ok"] = nm_ok(gm)
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)
        if flush is not None:
            flush(rows)

    stats = None
    if any(m != "magnitude" for m in args.oneshot):
        t0 = time.perf_counter()
        seqs = next(windows(text.train, text.seq, args.calib, 500 + seed))
        batches = [(seqs[i:i + 8],) for i in range(0, seqs.shape[0], 8)]
        probe = capture(model, text.seq, "sparsegpt", "2:4", args.capture, sequential=False)
        stats = collect_statistics(probe, batches)
        del probe
        calib_seconds = time.perf_counter() - t0
        print(f"calibration statistics: {args.calib} x {text.seq} tokens, "
              f"{calib_seconds:.0f} s", flush=True)
    budget = args.steps * args.batch * args.train_seq
    for target in args.targets:
        gran, sparsity = TARGETS[target]
        oneshot: dict[str, tuple[torch.nn.Module, float]] = {}
        for method in args.oneshot:
            t0 = time.perf_counter()
            options: dict[str, Any] = {"target_sparsity": sparsity}
            if method == "magnitude" and gran == "element":
                options["scope"] = "layer"
            if method in ("wanda", "sparsegpt"):
                options["sequential"] = False
            gm = capture(model, text.seq, method, gran, args.capture, **options)
            if method != "magnitude":
                sf.calibrate(gm, statistics=stats)
            row = {"method": method, "target": target, "seconds": time.perf_counter() - t0,
                   "tokens": 0 if method == "magnitude" else args.calib * text.seq}
            if method != "magnitude":
                row["calibration_pass_seconds"] = calib_seconds
            record(row, gm)
            best_so_far = min(oneshot.values(), key=lambda v: v[1])[1] if oneshot else None
            if best_so_far is None or rows[-1]["ppl"] < best_so_far:
                oneshot = {method: (gm, rows[-1]["ppl"])}  # keep only the best model
            del gm
        best = next(iter(oneshot))
        if target == args.targets[-1]:
            stats = None  # the last target is cut: the Hessians (~0.8 GB) are not needed
        gc.collect()
        if args.steps <= 0:
            continue
        if target in args.cs_targets:
            torch.manual_seed(seed)
            cs = capture(model, text.seq, "cs", gran, args.capture, target_sparsity=sparsity,
                         s_init=args.s_init, rescale=not args.no_rescale, per_layer=True)
            init_cs_from_masks(cs, oneshot[best][0])
            sched = sf.CSScheduler(cs, epochs=1, per_step=True, steps_per_epoch=args.steps,
                                   beta_final=args.beta_final)
            seconds = train(cs, text, args, seed, args.mask_lr, sched)
            if sched.cut is None:
                raise RuntimeError("the CS schedule did not make its exact cut")
            record({"method": f"cs (learned, from {best})", "target": target,
                    "seconds": seconds, "tokens": budget,
                    "mask_bits_changed": sched.mask_bits_changed(),
                    "mask_bits": sum(e.mask.numel() for e in sf.masks(cs))}, cs)
            del cs, sched
            gc.collect()  # mask parametrizations hold reference cycles: free the CS model now
        fixed = oneshot[best][0]
        seconds = train(fixed, text, args, seed)
        record({"method": f"{best} + fine-tune (mask fixed)", "target": target,
                "seconds": seconds, "tokens": budget}, fixed)
        del fixed, oneshot
        gc.collect()
    return rows


def structured_rows(model: torch.nn.Module, text: Text, args: argparse.Namespace, seed: int,
                    dense_ppl: float, flush: Any = None) -> list[dict[str, Any]]:
    """L1 one-shot, L1 + fine-tune and CS from the L1 cut per ``--block-keep``;
    ``flush(rows)`` after each row."""
    from sparsify_fx.budgets.cost_model import channel_macs
    from sparsify_fx.budgets.exact_cut import apply_budget, weight_costs
    from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
    rows: list[dict[str, Any]] = []
    x = (torch.zeros(1, text.seq, dtype=torch.long),)
    budget = args.steps * args.batch * args.train_seq
    for keep in args.block_keep:
        t0 = time.perf_counter()
        oneshot = capture(model, text.seq, "magnitude", "channel", "export").eval()
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
        if flush is not None:
            flush(rows)
        seconds = train(small, text, args, seed)
        ppl = perplexity(small, text.val)
        rows.append({**base, "method": "L1 + fine-tune", "ppl": ppl, "gap": ppl - dense_ppl,
                     "seconds": seconds, "tokens": budget})
        print(rows[-1], flush=True)
        if flush is not None:
            flush(rows)
        del small
        torch.manual_seed(seed)
        cs = capture(model, text.seq, "cs", "channel", "export", target_macs=target,
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
        if flush is not None:
            flush(rows)
        del cs, oneshot
    return rows


#: the row columns a summary averages over seeds
SUMMARY_COLUMNS = ("ppl", "gap", "seconds", "tokens", "mask_bits_changed", "mask_bits",
                   "changed_slots", "load_average", "calibration_pass_seconds")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return mean_sd_by_method(rows, SUMMARY_COLUMNS)


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
    budget = a["steps"] * a["batch"] * a["train_seq"]
    lines = ["# SmolLM2-135M (pretrained) pruned on pydocs", "",
             f"`{result['command']}` — {result['machine']}", "",
             f"Model: {result['model']}. Validation: {result['val_tokens']:,} tokens "
             f"({a['val_windows']} windows x {a['seq']}) of the held-out documents; seeds "
             f"{a['seeds']}. Calibration: {a['calib']} x {a['seq']} = "
             f"{a['calib'] * a['seq']:,} training tokens, one pass through the dense model "
             "(every layer's input Hessian; Wanda reads its diagonal; `sequential=False`). "
             f"Training rows: {a['steps']} steps x {a['batch']} x {a['train_seq']} = "
             f"{budget:,} tokens (lr: CS weights {a['cs_lr']}, fine-tune {a['ft_lr']}, CS "
             f"scores {a['mask_lr']}; s_init {a['s_init']}, rescale "
             f"{not a['no_rescale']}, beta 1 -> {a['beta_final']}). Masks: "
             f"{'parametrized Linear weights (capture=fx)' if a['capture'] == 'fx' else 'torch.export capture'}.",
             "", f"Dense perplexity: **{result['dense_ppl']:.3f}**.", "",
             "| method | target | ppl | gap to dense | training tokens | mask bits changed "
             "| seconds (prune / train) | load avg |", "|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        sd = f" ± {s['ppl_sd']:.3f} (n={s['n']})" if s["n"] > 1 else ""
        changed = ""
        if "mask_bits_changed" in s:
            changed = f"{s['mask_bits_changed']:,.0f} of {s.get('mask_bits', 0):,.0f}"
        elif "changed_slots" in s:
            changed = f"{s['changed_slots']:,.0f} slots"
        load = f"{s['load_average']:.1f}" if "load_average" in s else ""
        gsd = f" ± {s['gap_sd']:.3f}" if s["n"] > 1 else ""
        lines.append(f"| {s['method']} | {s['target']} | {s['ppl']:.3f}{sd} | {s['gap']:+.3f}{gsd} | "
                     f"{s['tokens']:,.0f} | {changed} | {s['seconds']:.0f} | {load} |")
    g = result.get("goal")
    if g:
        ratio = "undefined" if g["ratio"] is None else f"{g['ratio']:.2f}"
        lines += ["", f"Goal: learned 2:4 gap {g['cs_gap']:+.3f} vs best one-shot "
                  f"({g['best_oneshot']}) {g['best_gap']:+.3f}: ratio {ratio} "
                  f"({'met' if g['met'] else 'not met'}; goal <= 0.5)."]
    if "calibration_pass_seconds" in result:
        lines += ["", f"The calibration pass took {result['calibration_pass_seconds']:.0f} s "
                  "(shared by every Wanda and SparseGPT row; not in their seconds)."]
    state = "complete" if result.get("complete") else "partial (rows so far)"
    lines += ["", f"Wall time {result['seconds']:.0f} s, {state}; load average now "
              f"{result['load_average']:.1f} (2 cores shared with other jobs)."]
    return "\n".join(lines) + "\n"


def merge(paths: list[str], out: str, argv: list[str] | None) -> None:
    """One table from runs of single seeds (separate processes, same arguments otherwise):
    their rows together, mean and spread per row; each run's command, wall time and load.
    A seed found in several runs (one stopped part-way and run again) takes the rows of the
    run that holds the most of them (the later on a tie); the others' rows of it are left
    out. Complete when every seed has as many rows as the fullest one."""
    import json
    runs = [json.load(open(p)) for p in paths]
    chosen: dict[int, list[dict[str, Any]]] = {}  # a seed in several runs: its fullest run
    for run in runs:
        for seed in sorted({r["seed"] for r in run["rows"]}):
            mine = [r for r in run["rows"] if r["seed"] == seed]
            if len(mine) >= len(chosen.get(seed, [])):
                chosen[seed] = mine
    rows = [r for seed in sorted(chosen) for r in chosen[seed]]
    per_seed = max(len(v) for v in chosen.values())  # the fullest seed's rows
    keys = ("calib", "seq", "val_windows", "steps", "batch", "train_seq", "targets")
    for run in runs[1:]:
        if any(run["args"][k] != runs[0]["args"][k] for k in keys):
            raise SystemExit(f"merge: the runs differ in {keys}; merge only like runs")
    result = dict(runs[0])
    result["args"] = {**runs[0]["args"], "seeds": sorted({r["seed"] for r in rows})}
    result.update(command=command_line("llm_pretrained.py", argv), rows=rows,
                  summary=summarize(rows),
                  complete=all(len(v) == per_seed for v in chosen.values()),
                  seconds=max(r["seconds"] for r in runs),
                  load_average=os.getloadavg()[0],
                  runs=[{"command": r["command"], "seconds": r["seconds"],
                         "load_average": r["load_average"], "complete": r.get("complete"),
                         "seeds": r["args"]["seeds"]} for r in runs])
    result["goal"] = goal(result["summary"])
    text = markdown(result)
    text += "\nMerged from these runs (1 torch thread each):\n\n" + "\n".join(
        f"- `{r['command']}`: seeds {r['seeds']}, {r['seconds']:.0f} s, "
        f"{'complete' if r['complete'] else 'partial'}, load average at its last write "
        f"{r['load_average']:.1f}" for r in result["runs"]) + "\n"
    write_results(out, result, text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--out", default="benchmarks/results/llm_pretrained")
    p.add_argument("--parts", nargs="+", default=["element", "structured"],
                   choices=["element", "structured", "dense-finetune"],
                   help="dense-finetune: the dense model trained on the same token budget "
                        "(the reference for the training rows: in-domain adaptation)")
    p.add_argument("--targets", nargs="+", default=["2:4", "50%"], choices=list(TARGETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--seq", type=int, default=256, help="validation / calibration window")
    p.add_argument("--val-windows", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--calib", type=int, default=128, help="calibration windows of --seq tokens")
    p.add_argument("--oneshot", nargs="+", default=list(ONESHOT), choices=ONESHOT)
    p.add_argument("--capture", default="fx", choices=["fx", "export"],
                   help="element / N:M masks: parametrized weights (fx) or torch.export")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--train-seq", type=int, default=128)
    p.add_argument("--cs-lr", type=float, default=1e-4)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--mask-lr", type=float, default=0.5)
    p.add_argument("--channel-mask-lr", type=float, default=0.2)
    p.add_argument("--s-init", type=float, default=4.0)
    p.add_argument("--no-rescale", action="store_true")
    p.add_argument("--cs-targets", nargs="*", default=list(TARGETS), choices=list(TARGETS),
                   help="targets that get a CS row (default: all)")
    p.add_argument("--beta-final", type=float, default=10.0)
    p.add_argument("--block-keep", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a loaded 2-core machine 1 was faster than 2)")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge these single-seed results into --out (no run)")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out, argv)
        return
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from sparsify_fx.hf.checkpoint_files import load_pretrained
    from sparsify_fx.hf.pretrained import CHECKPOINTS, pretrained_path
    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(pretrained_path("smollm2"), "causal-lm")
    model.config.use_cache = False
    text = Text(tokenizer, args.corpus, args.seq, args.val_windows)
    dense_ppl = perplexity(model, text.val, batch=args.eval_batch)
    print(f"dense ppl {dense_ppl:.3f} ({text.val.numel()} tokens, "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    done: list[dict[str, Any]] = []

    def write(rows: list[dict[str, Any]], complete: bool = False) -> None:
        summary = summarize(done + rows)
        result = {"command": command_line("llm_pretrained.py", argv),
                  "machine": machine(args.threads), "args": vars(args),
                  "model": CHECKPOINTS["smollm2"].description,
                  "params": sum(p.numel() for p in model.parameters()),
                  "train_tokens": int(text.train.numel()), "val_tokens": int(text.val.numel()),
                  "dense_ppl": dense_ppl, "rows": done + rows, "summary": summary,
                  "goal": goal(summary), "seconds": time.perf_counter() - t0,
                  "load_average": os.getloadavg()[0], "complete": complete}
        calib = [r["calibration_pass_seconds"] for r in done + rows
                 if "calibration_pass_seconds" in r]
        if calib:
            result["calibration_pass_seconds"] = calib[0]
        write_results(args.out, result, markdown(result))

    for seed in args.seeds:
        if "dense-finetune" in args.parts:
            import copy
            tuned = copy.deepcopy(model)
            seconds = train(tuned, text, args, seed)
            ppl = perplexity(tuned, text.val, batch=args.eval_batch)
            done.append({"method": "dense + fine-tune", "target": "-", "seed": seed,
                         "ppl": ppl, "gap": ppl - dense_ppl, "seconds": seconds,
                         "tokens": args.steps * args.batch * args.train_seq,
                         "load_average": os.getloadavg()[0]})
            print(done[-1], flush=True)
            del tuned
            write([])
        if "element" in args.parts:
            done += element_rows(model, text, args, seed, dense_ppl, write)
        if "structured" in args.parts:
            done += structured_rows(model, text, args, seed, dense_ppl, write)
            write([])
    write([], complete=True)


if __name__ == "__main__":
    main()
