"""Causal-LM pruning on real text (issue 23): held-out perplexity of one-shot and learned masks.

A small Llama (``llm_text.py``: pydocs corpus, local byte-level BPE) is trained once and
cached; each seed then prunes that checkpoint at 50 % (every layer) and 2:4 with

* one-shot: magnitude (per layer), Wanda and SparseGPT (``calibrate`` on 128 training
  sequences, sampled per seed);
* CS (``method="cs"``, masks and weights trained with the LM loss for ``--cs-steps``),
  its scores started from a one-shot mask (``init_cs_from_masks``): magnitude (the
  weights alone) or SparseGPT (``--cs-inits``; ``weights``: the reference uniform start);

and every pruned model is also fine-tuned for ``--ft-steps`` with its mask fixed.
lm_head is tied to the embedding, so it is not pruned (as in the published methods).

    .venv/bin/python benchmarks/llm_pruning.py [--quick] [--seeds 0 1 2]
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
from llm_text import LMConfig, Task, load_or_train, perplexity, train_lm, windows
from sparsify_fx.baselines.mask_init import init_cs_from_masks

CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "text",
                      "pydocs.txt")
TARGETS = {"50%": ("element", 0.5), "2:4": ("2:4", None)}
ONESHOT = ("magnitude", "wanda", "sparsegpt")
CS_INITS = ("magnitude", "sparsegpt")


def transform(task: Task, method: str, target: str, **options: Any) -> torch.nn.Module:
    gran, sparsity = TARGETS[target]
    if method == "magnitude" and gran == "element":
        options.setdefault("scope", "layer")  # every layer at 50 %, like Wanda / SparseGPT
    example = (torch.zeros(2, task.cfg.seq, dtype=torch.long),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sf.transform(task.model, method=method, granularity=gran,
                            target_sparsity=sparsity, example_inputs=example,
                            dynamic_shapes=({0: torch.export.Dim.AUTO},), **options)


def weight_groups(gm: torch.nn.Module, lr: float, mask_lr: float | None = None
                  ) -> list[dict[str, Any]]:
    """AdamW groups: matrices (decay 0.1), vectors (no decay), mask scores (``mask_lr``)."""
    weights, masks = sf.param_groups(gm, lr=lr)
    groups = [{"params": [p for p in weights["params"] if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in weights["params"] if p.dim() < 2], "weight_decay": 0.0}]
    if mask_lr is not None and masks["params"]:
        groups.append({"params": masks["params"], "lr": mask_lr, "weight_decay": 0.0})
    return groups


def finetune(gm: torch.nn.Module, task: Task, args: argparse.Namespace, seed: int) -> float:
    """``--ft-steps`` of LM loss with the masks fixed (mask scores not optimised); seconds."""
    t0 = time.perf_counter()
    train_lm(gm, windows(task.train_ids, task.cfg.seq, task.cfg.batch, 1000 + seed),
             args.ft_steps, args.ft_lr, groups=weight_groups(gm, args.ft_lr), warmup=10)
    return time.perf_counter() - t0


def calibration(task: Task, args: argparse.Namespace, seed: int) -> list[tuple[torch.Tensor]]:
    """``--calib`` random training windows (seeded), in batches of 16."""
    data = windows(task.train_ids, task.cfg.seq, args.calib, 500 + seed)
    seqs = next(data)
    return [(seqs[i:i + 16],) for i in range(0, seqs.shape[0], 16)]


def run_cs(task: Task, target: str, init: str, oneshot: torch.nn.Module | None,
           args: argparse.Namespace, seed: int) -> tuple[torch.nn.Module, int]:
    """CS from ``oneshot``'s mask (``init="weights"``: every score at ``s_init``):
    ``--cs-steps`` of LM loss + CS penalty, per-step beta, per-layer lambda control and
    the exact cut at the last step (``CSScheduler``). Returns the model and how many
    mask bits the training changed from the start (counted from the masks)."""
    torch.manual_seed(seed)
    gm = transform(task, "cs", target, s_init=args.s_init, rescale=not args.no_rescale,
                   per_layer=True)
    if init != "weights":  # "weights": the reference CS start, every score at s_init
        init_cs_from_masks(gm, oneshot)
    start = {e.name: e.mask.learned_keep().clone() for e in sf.masks(gm)}
    cs = sf.CSScheduler(gm, epochs=1, per_step=True, steps_per_epoch=args.cs_steps,
                        beta_final=args.beta_final)
    train_lm(gm, windows(task.train_ids, task.cfg.seq, task.cfg.batch, 2000 + seed),
             args.cs_steps, args.cs_lr, groups=weight_groups(gm, args.cs_lr, args.mask_lr),
             warmup=10, penalty=cs.penalty, after_step=lambda _s: cs.step())
    if cs.cut is None:
        raise RuntimeError("the CS schedule did not make its exact cut")
    return gm, sum(int((e.mask.hard_mask() != start[e.name]).sum()) for e in sf.masks(gm))


def nm_ok(gm: torch.nn.Module) -> bool:
    """Every full group of 4 inputs keeps exactly 2 (counted from the mask tensors)."""
    for e in sf.masks(gm):
        keep = e.mask.hard_mask()
        if not bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()):
            return False
    return True


def run_seed(task: Task, args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    rows = []
    batches = calibration(task, args, seed)

    def record(name: str, target: str, gm: torch.nn.Module, seconds: float, **extra: Any) -> None:
        ppl = perplexity(gm, task.val)
        ft_seconds = finetune(gm, task, args, seed)
        row = {"seed": seed, "method": name, "target": target, "ppl": ppl,
               "ppl_ft": perplexity(gm, task.val), "sparsity": float(sf.sparsity(gm)),
               "seconds": seconds, "ft_seconds": ft_seconds, **extra}
        if target == "2:4":
            row["pattern_ok"] = nm_ok(gm)
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    for target in TARGETS:
        oneshot: dict[str, torch.nn.Module] = {}
        for method in ONESHOT:
            t0 = time.perf_counter()
            gm = transform(task, method, target)
            if method != "magnitude":
                sf.calibrate(gm, batches)
            seconds = time.perf_counter() - t0
            if method in args.cs_inits:  # record fine-tunes gm: CS starts from a copy
                oneshot[method] = copy.deepcopy(gm)
            record(method, target, gm, seconds)
        for init in args.cs_inits:
            t0 = time.perf_counter()
            gm, changed = run_cs(task, target, init, oneshot.get(init), args, seed)
            label = "cs (uniform start)" if init == "weights" else f"cs (from {init} mask)"
            record(label, target, gm, time.perf_counter() - t0, mask_bits_changed=changed)
    return rows


def summarize(rows: list[dict[str, Any]], dense: float) -> list[dict[str, Any]]:
    out = []
    for key in dict.fromkeys((r["method"], r["target"]) for r in rows):
        sel = [r for r in rows if (r["method"], r["target"]) == key]
        stat = {"method": key[0], "target": key[1], "n": len(sel)}
        for col in ("ppl", "ppl_ft", "seconds", "ft_seconds", "sparsity"):
            vals = [r[col] for r in sel]
            stat[col] = statistics.mean(vals)
            stat[col + "_sd"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        stat["gap"], stat["gap_ft"] = stat["ppl"] - dense, stat["ppl_ft"] - dense
        out.append(stat)
    return out


def goal(summary: list[dict[str, Any]], col: str = "gap") -> dict[str, Any]:
    """CS 2:4's gap to dense against the best one-shot 2:4 gap (``col``: gap or gap_ft)."""
    nm = [s for s in summary if s["target"] == "2:4"]
    best = min((s for s in nm if s["method"] in ONESHOT), key=lambda s: s[col])
    cs = min((s for s in nm if s["method"].startswith("cs")), key=lambda s: s[col])
    ratio = cs[col] / best[col] if best[col] > 0 else None  # no gap to halve: undefined
    return {"cs": cs["method"], "cs_gap": cs[col], "best_oneshot": best["method"],
            "best_gap": best[col], "ratio": ratio,
            "met": ratio is not None and ratio <= 0.5}


def markdown(result: dict[str, Any]) -> str:
    a, d = result["args"], result["dense"]
    tok = a["batch"] * a["seq"]
    lines = [
        "# Causal-LM pruning on pydocs (held-out token perplexity)", "",
        f"`{result['command']}` — {result['machine']}", "",
        f"Model: Llama {a['layers']} layers, hidden {a['hidden']}, {a['heads']} heads / "
        f"{a['kv_heads']} KV heads, MLP {a['intermediate']}, vocab {d['vocab']} (byte-level "
        f"BPE), {d['params']:,} parameters, tied lm_head (not pruned); trained "
        f"{a['steps']} steps x {tok} tokens in {d['train_seconds']:.0f} s. Validation: "
        f"{d['val_tokens']:,} tokens of the held-out documents. Seeds: {a['seeds']}.", "",
        f"Token budgets: calibration {a['calib']} sequences x {a['seq']} = "
        f"{a['calib'] * a['seq']:,} tokens (Wanda, SparseGPT); CS {a['cs_steps']} steps x "
        f"{tok} = {a['cs_steps'] * tok:,} tokens; fine-tune (mask fixed) {a['ft_steps']} "
        f"steps x {tok} = {a['ft_steps'] * tok:,} tokens.", "",
        f"Dense perplexity: **{d['ppl']:.3f}**.", "",
        "| method | target | ppl (one-shot / CS at its cut) | gap | ppl after fine-tune | gap |"
        " sparsity | seconds (prune) | seconds (fine-tune) |",
        "|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        lines.append(
            f"| {s['method']} | {s['target']} | {s['ppl']:.3f} ± {s['ppl_sd']:.3f} | "
            f"{s['gap']:+.3f} | {s['ppl_ft']:.3f} ± {s['ppl_ft_sd']:.3f} | {s['gap_ft']:+.3f} "
            f"| {s['sparsity']:.4f} | {s['seconds']:.1f} | {s['ft_seconds']:.1f} |")
    for key, label in (("goal", "at the cut"), ("goal_ft", "after fine-tuning")):
        g = result[key]
        ratio = "undefined (no one-shot gap)" if g["ratio"] is None else f"{g['ratio']:.2f}"
        lines += ["", f"Goal ({label}): {g['cs']} 2:4 gap {g['cs_gap']:+.3f} vs best one-shot "
                  f"({g['best_oneshot']}) {g['best_gap']:+.3f}: ratio {ratio} "
                  f"({'met' if g['met'] else 'not met'}; goal <= 0.5)."]
    lines += ["", f"Total wall time {result['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--cache", default="benchmarks/results/llm_ckpt")
    p.add_argument("--out", default="benchmarks/results/llm_pruning")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--cs-steps", type=int, default=60)
    p.add_argument("--ft-steps", type=int, default=60)
    p.add_argument("--cs-lr", type=float, default=1e-4, help="CS: weights' lr")
    p.add_argument("--mask-lr", type=float, default=0.05, help="CS: mask scores' lr")
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--s-init", type=float, default=4.0)
    p.add_argument("--no-rescale", action="store_true", help="CS masks without 1/sigmoid(s_init)")
    p.add_argument("--beta-final", type=float, default=200.0)
    p.add_argument("--cs-inits", nargs="+", default=list(CS_INITS),
                   choices=["weights", "magnitude", "wanda", "sparsegpt"],
                   help="CS score starts: a one-shot mask, or 'weights' (every score s_init)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny model, 1 seed: a smoke run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # CS: sigmoid(beta * s) passes through denormals (10x slower)
    cfg = LMConfig()
    if args.quick:
        cfg = LMConfig(hidden=64, layers=2, intermediate=128, vocab=512, steps=30, batch=8)
        args.cache, args.out = args.cache + "_quick", args.out + "_quick"
        args.seeds, args.calib, args.cs_steps, args.ft_steps = args.seeds[:1], 32, 6, 4
    t0 = time.perf_counter()
    task = load_or_train(args.corpus, args.cache, cfg)
    if args.quick:
        task.val = task.val[:32]
    dense = perplexity(task.model, task.val)
    rows = [r for seed in args.seeds for r in run_seed(task, args, seed)]
    summary = summarize(rows, dense)
    result = {"command": command_line("llm_pruning.py", argv), "machine": machine(args.threads),
              "args": {**vars(args), **cfg.key()},
              "dense": {**task.meta, "ppl": dense, "val_tokens": int(task.val.numel())},
              "rows": rows, "summary": summary, "goal": goal(summary),
              "goal_ft": goal(summary, "gap_ft"), "seconds": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
