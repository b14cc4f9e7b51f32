"""Small CS hyperparameter sweep backing docs/cs_hyperparameters.md.

Part A (reference CS, no target): lambda and s_init against the sparsity CS
ends at, to show that with lambda = 1e-8 ``s_init`` sets the sparsity.
Part B (target 95 %, lambda controller + exact top-k cut): beta_final, the
beta schedule (per epoch / per step) and s_init against accuracy and the bits
the final cut flipped.

    python benchmarks/compare_cs_sweep.py            # digits, LeNet-300-100, 2 seeds

Writes benchmarks/results/compare_cs_sweep.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from typing import Any

import torch

import compare_methods as cm  # benchmarks/ is on sys.path when run as a script
from compare import measure, model_factory

import sparsify_fx as sf
from sparsify_fx.data import digits, mnist

PART_A = [dict(lmbda=l, s_init=s) for l in (1e-8,) for s in (-0.5, -0.2, 0.0, 0.2)] + \
         [dict(lmbda=l, s_init=0.0) for l in (1e-6, 1e-4, 1e-2)]
PART_B = [dict(beta_final=bf, per_step=ps, s_init=0.0) for bf in (50.0, 200.0, 1000.0)
          for ps in (False, True)] + [dict(beta_final=200.0, per_step=True, s_init=s)
                                      for s in (-0.3, 0.3)]


def run_cs(make: Any, data: Any, b: cm.Budget, seed: int, target: float | None,
           s_init: float, **sched: Any) -> dict[str, Any]:
    """Train one CS model (then fine-tune with the mask fixed); returns its measurements."""
    torch.manual_seed(seed)
    gm = sf.transform(make(), method="cs", target_sparsity=target, s_init=s_init)
    start = time.perf_counter()
    run = cm._fit(gm, data, b, b.train, cm.LR, seed, mask_lr=cm.MASK_LR, **sched)
    if target is None:  # no exact cut: freeze the learned s > 0 before fine-tuning
        for e in sf.masks(gm):
            e.mask.freeze(e.mask.learned_keep())
    cm._finetune(gm, data, b, seed)
    row = measure(gm, data, data.test.tensors[0][:2])
    row.update(changed_bits=run.cut.changed_bits if run.cut else None,
               wall_s=time.perf_counter() - start)
    return row


def _ms(values: list[float], fmt: str) -> str:
    m = statistics.fmean(values)
    s = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{m:{fmt}} ± {s:{fmt}}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="MNIST folder; default scikit-learn digits")
    p.add_argument("--model", default="lenet300100")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--train-epochs", type=int, default=8)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = mnist(args.data_dir, 0) if args.data_dir else digits(0)
    b = cm.Budget(args.train_epochs, args.finetune_epochs, 128 if args.data_dir else 32)
    make = model_factory(args.model, data)
    stem = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    "compare_cs_sweep")
    command = " ".join(["python benchmarks/compare_cs_sweep.py", *(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    rows: list[dict[str, Any]] = []
    for part, grid, target in (("A", PART_A, None), ("B", PART_B, args.target)):
        for cfg in grid:
            for seed in args.seeds:
                opts = dict(cfg)
                s_init = opts.pop("s_init")
                r = run_cs(make, data, b, seed, target, s_init, **opts)
                rows.append({"part": part, "seed": seed, "target": target, "s_init": s_init,
                             **opts, **r})
                print(part, cfg, seed, f"sparsity {r['sparsity']:.4f} acc {r['test_acc']:.2f} "
                      f"changed {r['changed_bits']}", flush=True)
    lines = ["# CS hyperparameter sweep", "", f"Command: `{command}`", "",
             f"{args.model} on {'MNIST' if args.data_dir else 'digits'}, {b.train} CS epochs "
             f"(lr 0.05, Adam mask lr 0.01) + {b.finetune} fine-tune epochs (mask fixed), "
             f"batch {b.batch}, seeds {args.seeds}; test accuracy of the folded model.", "",
             "## A. Reference CS, no target (beta_final 200, beta stepped per epoch)", "",
             "| lambda | s_init | sparsity reached | test acc % |", "|---|---|---|---|"]
    for cfg in PART_A:
        rs = [r for r in rows if r["part"] == "A" and r["lmbda"] == cfg["lmbda"]
              and r["s_init"] == cfg["s_init"]]
        lines.append(f"| {cfg['lmbda']:g} | {cfg['s_init']:g} | "
                     f"{_ms([r['sparsity'] for r in rs], '.4f')} | "
                     f"{_ms([r['test_acc'] for r in rs], '.2f')} |")
    lines += ["", f"## B. Exact target {args.target:.0%} (lambda controller + final top-k cut)", "",
              "| beta_final | beta schedule | s_init | sparsity | test acc % | bits flipped by the cut |",
              "|---|---|---|---|---|---|"]
    for cfg in PART_B:
        rs = [r for r in rows if r["part"] == "B" and r["beta_final"] == cfg["beta_final"]
              and r["per_step"] == cfg["per_step"] and r["s_init"] == cfg["s_init"]]
        lines.append(f"| {cfg['beta_final']:g} | {'per step' if cfg['per_step'] else 'per epoch'} "
                     f"| {cfg['s_init']:g} | {_ms([r['sparsity'] for r in rs], '.4f')} | "
                     f"{_ms([r['test_acc'] for r in rs], '.2f')} | "
                     f"{_ms([float(r['changed_bits']) for r in rs], '.0f')} |")
    md = "\n".join(lines) + "\n"
    with open(stem + ".json", "w") as fh:
        json.dump({"command": command, "settings": vars(args), "rows": rows}, fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
